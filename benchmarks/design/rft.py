"""Development experiment (see benchmarks/design/README.md); run from the repository root."""
import copy, json, sys, time, torch
from pgb.modeling import load_task_model
from pgb.tasks import get_task
from pgb.taskdata import TaskData
from pgb.config import CompressConfig
from pgb.pipeline import compress
from dataclasses import replace
task=get_task(sys.argv[1]); S=float(sys.argv[2])
t,tok,_=load_task_model(f"runs/teachers/{sys.argv[1]}",task); t.eval()
data=TaskData(task,tok,"../shared/data",None,128)
for spec in sys.argv[3:]:
    kw=json.loads(spec)
    cfg=CompressConfig(sparsity=S, **kw)
    s=time.time()
    r=compress(t,tok,task,cfg,data,progress=False)
    rep=r.report
    print(spec, "groups", rep["groups"], "dropped", rep["dropped_sublayers"], "metrics", rep["metrics"], "teacher", rep["teacher_metrics"], "sec", {k:round(v) for k,v in rep["stage_seconds"].items()}, flush=True)
