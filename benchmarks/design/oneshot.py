"""Development experiment (see benchmarks/design/README.md); run from the repository root."""
import sys, json, time, torch
from pgb.modeling import load_task_model
from pgb.tasks import get_task
from pgb.taskdata import TaskData
from pgb.config import CompressConfig
from pgb.pipeline import run_method
task=get_task(sys.argv[1])
t,tok,_=load_task_model(f"runs/teachers/{sys.argv[1]}",task); t.eval()
data=TaskData(task,tok,"../shared/data",None,128,max_samples=4000)
data.teacher_metrics=json.load(open(f"runs/teachers/{sys.argv[1]}/metrics.json"))["metrics"]
for spec in sys.argv[2:]:
    kw=json.loads(spec)
    s=time.time()
    r=run_method(t,tok,task,CompressConfig(refinetune=False,**kw),data,progress=False)
    rep=r.report
    print(spec, "metrics", rep["metrics"], "drop", rep["dropped_sublayers"], "sec", {k:round(v) for k,v in rep["stage_seconds"].items()}, flush=True)
