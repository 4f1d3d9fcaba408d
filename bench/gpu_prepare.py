"""Build .dev/, what bench/gpu.sh needs on a lent GPU machine that has torch and transformers but
no network and none of our other dependencies, within one call's 64 MiB:

    python -m bench.gpu_prepare [--layers 18] [--datasets ml-100k]

- .dev/whl: cp312 wheels of the pure dependencies the offline trainer imports (versions of this env)
- .dev/data: the datasets as Parquet (a quarter of JSONL's size)
- .dev/cache/item_embeddings: their SmolLM2 item content, so the item encoder is not rerun there
- .dev/llm: SmolLM2-135M cut to its first ``--layers`` blocks. The user LLM reads ``inputs_embeds``
  and never the token table, so that table is requantized to Q4_0 to make room for more blocks; the
  blocks themselves are copied bit for bit. 18 of 30 blocks is what fits beside ml-100k alone;
  ``--layers 0`` leaves it out (the user LLM is then the tiny one) to make room for both datasets.

Add ``/.dev/`` to .git/info/exclude, then run bench/gpu.sh with carry .dev/whl .dev/data .dev/cache .dev/llm.
A rerun first removes what an earlier one wrote there (whatever the call carries must be this run's),
and nothing else: a developer's own files under .dev/ stay.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CALL_LIMIT = 64 * 2**20
# What this script writes in each part, so that a rerun removes exactly that.
OWN = {"whl": ["*.whl"], "data": ["*-interactions.parquet", "*-items.parquet"], "cache": ["item_embeddings/*.pt"],
       "llm": ["smollm2-*.gguf"]}
WHEELS = ["pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "typing-inspection", "annotated-types",
          "typing-extensions", "gguf"]


def own_files(parts: dict[str, Path]) -> list[Path]:
    return [f for name, path in parts.items() for pattern in OWN[name] for f in path.glob(pattern)]


def clear_previous(out: Path) -> dict[str, Path]:
    """The parts' folders under ``out``, created, without what an earlier run wrote into them."""
    parts = {name: out / name for name in OWN}
    for stale in own_files(parts):
        stale.unlink()
    for path in parts.values():
        path.mkdir(parents=True, exist_ok=True)
    (parts["cache"] / "item_embeddings").mkdir(exist_ok=True)
    return parts


def download_wheels(dest: Path) -> None:
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
                    "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(dest),
                    *pins], check=True)


def export_dataset(name: str, data: Path, cache: Path, settings) -> None:
    from model.item_encoder import embedding_cache_key
    from stream.datasets import export_ml100k, export_synthetic
    from trainer.data import leave_one_out, read_log
    from trainer.models import item_content

    with tempfile.TemporaryDirectory() as tmp:
        if name == "ml-100k":
            export_ml100k(tmp, settings)
        else:
            export_synthetic(tmp, users=1000, items=2000, interests=20, events_per_user=60, drift=0.0, seed=0)
        interactions, items = read_log(Path(tmp) / "interactions.jsonl", Path(tmp) / "items.jsonl")
    interactions.to_parquet(data / f"{name}-interactions.parquet")
    items.to_parquet(data / f"{name}-items.parquet")
    catalogue = leave_one_out(interactions, items).catalogue
    item_content(catalogue, "smollm2", settings)  # computes it into the cache on a miss
    key = embedding_cache_key("smollm2", catalogue.texts)
    shutil.copy(Path(settings.cache_dir) / "item_embeddings" / f"{key}.pt", cache)


def truncated_smollm2(layers: int, out: Path) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    from model.backbone import smollm2_path

    reader = GGUFReader(smollm2_path())
    writer = GGUFWriter(str(out), reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = layers if name.endswith(".block_count") else field.contents()
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(name, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, field.types[0])
    for t in reader.tensors:
        if t.name.startswith("blk.") and int(t.name.split(".")[1]) >= layers:
            continue
        if t.name == "token_embd.weight":
            table = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(x) for x in reversed(t.shape)])
            q4 = gguf.quants.quantize(table.astype(np.float32), GGMLQuantizationType.Q4_0)
            writer.add_tensor(t.name, q4, raw_dtype=GGMLQuantizationType.Q4_0)
        else:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    from hymirec.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=18, help="SmolLM2 blocks kept (of 30); 0: no user LLM")
    parser.add_argument("--datasets", default="ml-100k", help="comma list of ml-100k, synthetic")
    parser.add_argument("--out", type=Path, default=Path(".dev"))
    args = parser.parse_args()
    settings = Settings()
    parts = clear_previous(args.out)
    download_wheels(parts["whl"])
    for name in args.datasets.split(","):
        export_dataset(name.strip(), parts["data"], parts["cache"] / "item_embeddings", settings)
    if args.layers > 0:
        truncated_smollm2(args.layers, parts["llm"] / f"smollm2-{args.layers}.gguf")
    carried = [f for path in parts.values() for f in path.rglob("*") if f.is_file()]
    total = sum(f.stat().st_size for f in carried)
    print(f"{args.out}: {total / 2**20:.1f} MiB to carry (a call takes {CALL_LIMIT / 2**20:.0f} MiB with the repo)")
    others = sorted(set(carried) - set(own_files(parts)))
    if others:
        size = sum(f.stat().st_size for f in others) / 2**20
        print(f"  with {len(others)} file(s) this script did not write ({size:.1f} MiB; they travel too), e.g. {others[0]}")
    return 0 if total < CALL_LIMIT else 1


if __name__ == "__main__":
    sys.exit(main())
