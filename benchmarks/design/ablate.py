"""Development experiment (see benchmarks/design/README.md); run from the repository root."""
import copy, json, sys, time, torch
from pgb.modeling import load_task_model
from pgb.tasks import get_task
from pgb.taskdata import TaskData
from pgb.config import CompressConfig
from pgb.importance import importance_scores
from pgb.pipeline import search_groupings
from pgb.allocation import allocate
from pgb.arch import dims_of
from pgb.compensate import apply_masks, compensate
from pgb.evaluation import evaluate
task=get_task(sys.argv[1]); S=float(sys.argv[2])
t,tok,_=load_task_model(f"runs/teachers/{sys.argv[1]}",task); t.eval()
data=TaskData(task,tok,"../shared/data",None,128,max_samples=4000)
calib=data.calibration(int(sys.argv[3]) if len(sys.argv)>3 else 512,32,0)
raw=importance_scores(t,calib,progress=False)
for name,cfg in [("raw",CompressConfig(sparsity=S,normalize="none")),("mean",CompressConfig(sparsity=S)),
                 ("mean-noperm",CompressConfig(sparsity=S,permute=False)),("uniform",CompressConfig(sparsity=S,uniform_groups=True))]:
    sc = raw if cfg.normalize=="none" else {n: s/s.mean() for n,s in raw.items()}
    g=search_groupings(sc,t,cfg,progress=False)
    r=allocate(g,dims_of(t),"bert",S,uniform=cfg.uniform_g() if cfg.uniform_groups else None, allow_drop=not cfg.uniform_groups)
    st=copy.deepcopy(t); apply_masks(st,r)
    m0=evaluate(st,task,tok,"../shared/data",progress=False)
    compensate(st,t,r,calib,progress=False)
    m1=evaluate(st,task,tok,"../shared/data",progress=False)
    print(name, {p_.layer*10+(p_.kind=="ffn"):p_.groups for p_ in r.sublayers}, r.dropped_sublayers(), "masked",m0, "comp",m1, flush=True)
