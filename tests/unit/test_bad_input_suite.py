"""The bad-input suite: every malformed input retrack is known to refuse, in one table.

Each case goes through a real entry point (`retrack validate`, `retrack run`, `retrack unlearn`,
`retrack index neighbours`, `retrack audit`, or `open_index` as the job's neighbours stage calls
it) and must be refused with exit code 2 (or the library's error) and a message naming the field,
file or problem, before any expensive work: no Ray is started (`retrack run` refuses in its
preflight), and afterwards nothing exists that a later run could take for an output (no stage
marker, no model, no MLflow store, no neighbours file). docs/reliability.md tables these cases.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipelines.cli import app
from retrack.embedded.benchmark import load_digits_u8
from retrack.data.corpus import encode_image
from retrack.errors import RetrackError
from retrack.index import build_index, open_index
from tests.fixtures.corpora import write_corpus
from tests.fixtures.specs import DELETE, job_spec, with_field

SECRET = "s3cr3t-Should-Never-Print-0123456789"


@pytest.fixture(scope="module")
def env(model_dir, tmp_path_factory):
    """A valid setup every case breaks in one way: 64 digits in two shards, an untrained tiny
    UNet, a forget list, and a flat index of the corpus."""
    root = tmp_path_factory.mktemp("inputs")
    images, labels = load_digits_u8()
    write_corpus(root / "corpus", images[:64], ids=[f"img-{n:06d}" for n in range(64)], labels=labels[:64], shard_size=32)
    shutil.copytree(model_dir, root / "model")
    (root / "forget.txt").write_text("img-000001\nimg-000002\n")
    build_index(root / "corpus", root / "index")
    return root


def base_spec(env: Path, tmp: Path) -> dict:
    return job_spec(env / "model", env / "corpus", env / "forget.txt", tmp, "req-bad",
                    mlflow={"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "registered_model": "bad-ddpm"})


def write_yaml(tmp: Path, data) -> Path:
    path = tmp / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


# --- input builders: each returns the argv for `retrack` ------------------------------------


def spec_field(dotted: str, value, command: str = "validate"):
    def build(env: Path, tmp: Path) -> list[str]:
        return [command, str(write_yaml(tmp, with_field(base_spec(env, tmp), dotted, value)))]
    return build


def with_fields(spec: dict, fields: dict) -> dict:
    """`spec` with each field changed (dotted path with "__" for ".")."""
    for dotted, value in fields.items():
        with_field(spec, dotted.replace("__", "."), value)
    return spec


def spec_fields(**fields):
    return lambda env, tmp: ["validate", str(write_yaml(tmp, with_fields(base_spec(env, tmp), fields)))]


def spec_text(text: str):
    return lambda env, tmp: ["validate", str(write_yaml(tmp, text))]


def forget_list(lines: list[str]):
    def build(env: Path, tmp: Path) -> list[str]:
        (tmp / "ids.txt").write_text("\n".join(lines) + "\n")
        return ["run", str(write_yaml(tmp, with_field(base_spec(env, tmp), "forget.file", str(tmp / "ids.txt"))))]
    return build


def forget_pictures(*pictures: bytes):
    """`retrack run` of a request by picture: each of `pictures` written to a file of its own."""
    def build(env: Path, tmp: Path) -> list[str]:
        paths = []
        for n, data in enumerate(pictures):
            paths.append(str(tmp / f"picture-{n}.png"))
            Path(paths[-1]).write_bytes(data)
        return ["run", str(write_yaml(tmp, with_field(base_spec(env, tmp), "forget", {"images": paths})))]
    return build


def copy_edit(name: str, field: str, edit: Callable[[Path], None], **fields):
    """`retrack run` on a copy of the fixture's `name` directory changed by `edit(copy)`, named by
    the spec field `field`; `fields` (dotted path with "__" for ".") change the spec too."""
    def build(env: Path, tmp: Path) -> list[str]:
        copy = tmp / name
        shutil.copytree(env / name, copy)
        edit(copy)
        spec = with_fields(with_field(base_spec(env, tmp), field, str(copy)), fields)
        return ["run", str(write_yaml(tmp, spec))]
    return build


def corpus_edit(edit: Callable[[Path], None]):
    return copy_edit("corpus", "corpus.uri", edit)


def rewrite_rows(fn: Callable[[list[dict]], list[dict]], shard: int = 0, schema=None):
    def edit(corpus: Path) -> None:
        path = sorted(corpus.glob("*.parquet"))[shard]
        rows = fn(pq.read_table(path).to_pylist())
        pq.write_table(pa.Table.from_pylist(rows, schema=schema or pq.read_schema(path)), path)
    return edit


def set_row(n: int, **values):
    return rewrite_rows(lambda rows: [{**r, **values} if i == n else r for i, r in enumerate(rows)])


def model_edit(edit: Callable[[Path], None], **fields):
    return copy_edit("model", "model.uri", edit, **fields)


def edit_json(rel: str, **values):
    def edit(d: Path) -> None:
        cfg = json.loads((d / rel).read_text())
        (d / rel).write_text(json.dumps(cfg | values))
    return edit


def pickle_only(model: Path) -> None:
    w = model / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))


def index_edit(edit: Callable[[Path], None]):
    """`retrack index neighbours` on a copy of the built index changed by `edit(index_dir)`."""
    def build(env: Path, tmp: Path) -> list[str]:
        idx = tmp / "index"
        shutil.copytree(env / "index", idx)
        edit(idx)
        return ["index", "neighbours", str(idx), "--forget", str(env / "forget.txt"), "-k", "2", "--out", str(tmp / "nb.json")]
    return build


def flip_byte(rel_glob: str):
    def edit(idx: Path) -> None:
        f = sorted(idx.glob(rel_glob))[0]
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    return edit


def unlearn_args(**over):
    def build(env: Path, tmp: Path) -> list[str]:
        args = {"--model": str(env / "model"), "--corpus": str(env / "corpus"), "--forget-ids": str(env / "forget.txt"),
                "--out": str(tmp / "out"), "--steps": "1", "--batch-size": "4", **over}
        return ["unlearn"] + [x for kv in args.items() for x in kv]
    return build


@dataclass
class Case:
    name: str
    build: Callable[[Path, Path], list[str]]
    message: str  # must appear in the refusal
    secret: bool = False  # AWS_SECRET_ACCESS_KEY is set and must not appear in the output
    # Found where the image is decoded (the index stage; preflight reads no image): the index's
    # unfinished work files (no manifest) and the attempt's audit record may remain.
    at_index: bool = False


CASES = [
    # job specs (`retrack validate`; `retrack run` validates the same way)
    Case("spec: missing request_id", spec_field("request_id", DELETE), "request_id: Field required"),
    Case("spec: missing storage section", spec_field("storage", DELETE), "storage: Field required"),
    Case("spec: steps of the wrong type", spec_field("train.steps", "many"), "train.steps: Input should be a valid integer"),
    Case("spec: unknown method", spec_field("method.name", "forgetit"), "unknown method 'forgetit'"),
    Case("spec: lambda above 1", spec_field("method.params", {"lambda": 2, "k": 4}), "lambda: Input should be less than or equal to 1"),
    Case("spec: lambda below 0", spec_field("method.params", {"lambda": -0.1, "k": 4}), "lambda: Input should be greater than or equal to 0"),
    Case("spec: K below 1", spec_field("method.params", {"lambda": 0.5, "k": 0}), "k: Input should be greater than or equal to 1"),
    Case("spec: request id with ../ (path traversal)", spec_field("request_id", "../../etc"), "request_id '../../etc' must be"),
    Case("spec: request id with a slash", spec_field("request_id", "a/b"), "request_id 'a/b' must be"),
    Case("spec: unsupported storage scheme", spec_field("storage.root", "gs://bucket/x"), "storage.root: unsupported URI scheme"),
    Case("spec: s3 URI with ..", spec_field("model.uri", "s3://models/../other/m"), "model.uri: 's3://models/../other/m': '..' is not allowed"),
    Case("spec: tracking URI without scheme", spec_field("mlflow.tracking_uri", "localhost:5000"), "mlflow.tracking_uri: tracking_uri 'localhost:5000' must be"),
    Case("spec: credentials in a bad tracking URI are masked", spec_field("mlflow.tracking_uri", f"ftp://bob:{SECRET}@host"), "mlflow.tracking_uri: tracking_uri 'ftp://***@host' must be", secret=True),
    Case("spec: forget ids and file both given", spec_field("forget.ids", ["img-000001"]), "exactly one of forget.ids, forget.file and forget.images"),
    Case("spec: unknown field", spec_field("train.unknown", 1), "train.unknown: Extra inputs are not permitted"),
    Case("spec: batch not divisible by grad_accum", spec_field("train.grad_accum", 3), "batch_size 8 is not divisible by grad_accum 3"),
    Case("spec: forget batch not divisible by grad_accum", spec_field("train", {"steps": 2, "batch_size": 8, "forget_batch_size": 3, "grad_accum": 2}),
         "forget_batch_size 3 is not divisible by grad_accum 2"),
    Case("spec: grad_accum not a multiple of the workers", spec_fields(train__grad_accum=2, scaling={"num_workers": 4}),
         "train.grad_accum (2) must be a multiple of scaling.num_workers (4)"),
    Case("spec: siss with a forget batch of its own", spec_fields(method={"name": "siss", "params": {}}, train__forget_batch_size=4),
         "forget_batch_size 4 must equal batch_size 8"),
    Case("spec: a forget batch for a method that draws none", spec_fields(method={"name": "vanilla", "params": {}}, train__forget_batch_size=4),
         "train.forget_batch_size is set, but method 'vanilla' draws no forget batch"),
    Case("spec: fp16 on CPU workers", spec_field("train.mixed_precision", "fp16"),
         "train.mixed_precision 'fp16' needs scaling.use_gpu: true"),
    Case("spec: an fp16 loss scale without fp16", spec_field("scaling", {"fp16_loss_scale": 512.0}),
         "scaling.fp16_loss_scale is set, but train.mixed_precision is 'no'"),
    Case("spec: Stable Diffusion evaluation settings on a pixel model", spec_field("evaluation.stable_diffusion", {"inference_steps": 10}),
         "evaluation.stable_diffusion is set, but model.kind is pixel-ddpm"),
    Case("spec: a Fréchet ceiling on a Stable Diffusion model", spec_fields(model__kind="stable-diffusion", evaluation__gate={"max_frechet_ratio": 1.5}),
         "evaluation.gate.max_frechet_ratio is set, but model.kind is stable-diffusion"),
    Case("spec: a gate ceiling that is not positive", spec_field("evaluation.gate", {"max_integrity_ratio": 0}),
         "evaluation.gate.max_integrity_ratio: Input should be greater than 0"),
    Case("spec: flat_max_items with a fixed index kind", spec_field("index", {"kind": "flat", "flat_max_items": 10}),
         "index.flat_max_items is set, but index.kind is 'flat'"),
    Case("spec: a projected index with a shallow candidate list", spec_field("index", {"pca_dim": 64}),
         "index.pca_dim is set, so index.candidates_margin must be at least 256 (not 32)"),
    Case("spec: a registered name other than mlflow.registered_model", spec_field("model.registered_name", "other-ddpm"),
         "model.registered_name ('other-ddpm') and mlflow.registered_model ('bad-ddpm') differ"),
    Case("spec: a search on a Stable Diffusion model", spec_fields(model__kind="stable-diffusion", tune={"space": {"lambda": {"values": [0.1]}}}),
         "tune: `retrack tune` scores trials with the pixel-DDPM metrics"),
    Case("spec: too few evaluation samples", spec_field("evaluation.num_samples", 4), "evaluation.num_samples: Input should be greater than or equal to 16"),
    Case("spec: unknown duplicate policy", spec_field("forget.duplicates", "maybe"), "forget.duplicates: Input should be 'fail', 'warn' or 'add'"),
    Case("spec: YAML with a python tag (unsafe)", spec_text("!!python/object/apply:os.system ['echo pwned']"), "is not valid YAML"),
    Case("spec: YAML syntax error", spec_text("request_id: [unclosed"), "is not valid YAML"),
    Case("spec: YAML that is a list", spec_text("- a\n- b\n"), "must be a mapping of fields, got list"),
    Case("spec: file does not exist", lambda env, tmp: ["validate", str(tmp / "nope.yaml")], "nope.yaml does not exist"),
    # forget lists (`retrack run` preflight)
    Case("forget: id not in the corpus", forget_list(["img-000001", "no-such-id"]), "1 of 2 forget id(s) are not in the corpus (entries [2])"),
    Case("forget: duplicated id", forget_list(["img-000001", "img-000003", "img-000001"]), "1 forget id(s) are listed more than once (entries [1, 3])"),
    Case("forget: empty list", forget_list(["# nothing to forget"]), "the forget set is empty"),
    Case("forget: file does not exist", spec_field("forget.file", "/nonexistent/ids.txt", "run"), "forget-id file /nonexistent/ids.txt does not exist"),
    Case("forget: picture that cannot be decoded", forget_pictures(b"\x89PNG\r\n\x1a\n garbage"),
         "item 'forget.images entry 1': image bytes cannot be decoded"),
    Case("forget: the same picture twice", forget_pictures(encode_image(np.zeros((8, 8), np.uint8)), encode_image(np.zeros((8, 8), np.uint8))),
         "forget.images entries 1 and 2 are the same file"),
    Case("forget: picture file does not exist", spec_field("forget", {"images": ["/nonexistent/picture.png"]}, "run"), "forget.images entry 1 does not exist"),
    Case("forget: K larger than the retained set", spec_field("method.params", {"lambda": 0.5, "k": 1000}, "run"), "larger than the retained set"),
    # corpora (`retrack run` preflight)
    Case("corpus: corrupt image bytes", corpus_edit(set_row(3, image=b"\x89PNG\r\n\x1a\n garbage")), "item 'img-000003': image bytes cannot be decoded", at_index=True),
    Case("corpus: rows without a class label (pixel model)", corpus_edit(set_row(6, label=None)),
         "1 of 64 item(s) have no class label; the pixel evaluation's Fréchet distance uses a feature network"),
    Case("corpus: duplicate ids", corpus_edit(set_row(4, id="img-000009")), "1 id(s) occur more than once in the corpus"),
    Case("corpus: empty shard", corpus_edit(rewrite_rows(lambda rows: [], shard=1)), "shard part-00001.parquet is empty"),
    Case("corpus: missing id column", corpus_edit(rewrite_rows(lambda rows: [{"image": r["image"]} for r in rows], schema=pa.schema([("image", pa.binary())]))), "lacks column(s) ['id']"),
    Case("corpus: shard that is not parquet", corpus_edit(lambda c: (c / "part-00000.parquet").write_bytes(b"not parquet")), "part-00000.parquet cannot be read as parquet"),
    Case("corpus: directory does not exist", spec_field("corpus.uri", "/nonexistent/corpus", "run"), "corpus /nonexistent/corpus does not exist"),
    Case("corpus: parquet shards declared an image folder", spec_field("corpus.format", "imagefolder", "run"), "corpus.format is 'imagefolder' and the folder holds 2 .parquet"),
    # model directories (`retrack run` preflight)
    Case("model: not a UNet", model_edit(edit_json("unet/config.json", _class_name="AutoencoderKL")), "unet is a AutoencoderKL, expected a diffusers UNet2DModel"),
    Case("model: pickle-only .bin weights", model_edit(pickle_only), "no diffusion_pytorch_model.safetensors (found: ['diffusion_pytorch_model.bin']); only safetensors weights are loaded"),
    Case("model: missing UNet config", model_edit(lambda m: (m / "unet" / "config.json").unlink()), "missing config.json; expected a diffusers UNet directory"),
    Case("model: v-prediction scheduler", model_edit(edit_json("scheduler/scheduler_config.json", prediction_type="v_prediction")), "retrack's losses need 'epsilon'"),
    Case("method: t_min beyond the model's schedule", model_edit(edit_json("scheduler/scheduler_config.json", num_train_timesteps=100),
                                                                 method__params={"lambda": 0.5, "k": 4, "t_min": 500}),
         "retrack t_min 500 must be below the schedule's 100 timesteps"),
    Case("model: directory does not exist", spec_field("model.uri", "/nonexistent/model", "run"), "model directory /nonexistent/model does not exist"),
    Case("model: pixel DDPM declared stable-diffusion", spec_field("model.kind", "stable-diffusion", "run"), "holds a pixel-space DDPM (UNet2DModel), not a Stable Diffusion pipeline"),
    # services named in the spec (`retrack run` preflight)
    Case("services: tracking server unreachable", spec_field("mlflow.tracking_uri", f"http://retrack:{SECRET}@127.0.0.1:9", "run"), "MLflow tracking server http://***@127.0.0.1:9 is unreachable", secret=True),
    # index manifests and shards (`retrack index neighbours`)
    Case("index: shard bytes tampered", index_edit(flip_byte("shards/*.faiss")), "sha256 differs"),
    Case("index: manifest with the wrong dimension", index_edit(edit_json("manifest.json", dim=65)), "the manifest says 65"),
    Case("index: manifest missing", index_edit(lambda i: (i / "manifest.json").unlink()), "build it first"),
    Case("index: manifest not JSON", index_edit(lambda i: (i / "manifest.json").write_text("{oops")), "manifest.json is unreadable"),
    # CLI arguments
    Case("cli: --params not JSON", unlearn_args(**{"--params": "{lambda: 1"}), "--params is not JSON"),
    Case("cli: --params not an object", unlearn_args(**{"--params": "[1, 2]"}), "--params must be a JSON object"),
    Case("cli: --param without =", unlearn_args(**{"--param": "lambda"}), "expected KEY=VALUE, got 'lambda'"),
    Case("cli: zero workers", unlearn_args(**{"--workers": "0"}), "num_workers: Input should be greater than or equal to 1"),
    Case("cli: siss with a forget batch of its own", unlearn_args(**{"--method": "siss", "--forget-batch-size": "2"}),
         "forget_batch_size 2 must equal batch_size 4"),
    Case("cli: unknown mixed precision", unlearn_args(**{"--mixed-precision": "fp8"}), "mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
    Case("cli: audit with nothing to show", lambda env, tmp: ["audit", "--root", str(tmp / "jobs")], "give a REQUEST_ID or --model NAME"),
    Case("cli: audit request id with ../", lambda env, tmp: ["audit", "../../etc", "--root", str(tmp / "jobs")], "request id '../../etc' must be"),
    Case("cli: run with a missing spec", lambda env, tmp: ["run", str(tmp / "missing.yaml")], "missing.yaml does not exist"),
]


def written_outputs(tmp: Path, at_index: bool = False) -> list[str]:
    """Everything a refused command left that a later run could read as a result."""
    left = [p for p in tmp.rglob("*") if p.is_file() and (p.parts[-2] == "stages" or p.name in ("nb.json", "mlflow.db"))]
    jobs = tmp / "jobs"  # the storage root (and a job's folder) may exist, without files
    # The corpus's id table is the corpus's, not the job's: written by the scan the forget ids are checked against.
    allowed = [jobs / "corpus-ids"] + ([jobs / "indexes", jobs / "audit"] if at_index else [])
    left += [p for p in jobs.rglob("*") if p.is_file() and (not any(a in p.parents for a in allowed) or p.name == "manifest.json")]
    left += [p for p in (tmp / "out", tmp / "out.runs") if p.exists()]
    return [str(p) for p in left]


def test_the_suite_has_at_least_30_distinct_inputs():
    assert len({c.name for c in CASES}) == len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_with_a_specific_message_and_nothing_written(case, env, tmp_path, monkeypatch):
    import logging

    monkeypatch.setenv("RETRACK_HOME", str(tmp_path / "home"))
    # Ray Data's log handler keeps the stream of the CliRunner call that set it up (closed since);
    # the stdlib would print its write error, with a traceback, into this call's output.
    monkeypatch.setattr(logging, "raiseExceptions", False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    argv = case.build(env, tmp_path)
    result = CliRunner().invoke(app, argv)
    output = result.output.replace("\n", "")  # rich wraps long lines anywhere
    assert result.exit_code == 2, output
    assert case.message in output, output
    assert "Traceback" not in output and SECRET not in output
    assert written_outputs(tmp_path, case.at_index) == []


def test_the_good_input_passes_the_same_checks(env, tmp_path):
    """The base setup is valid: every refusal above is due to its one change."""
    from pipelines.job import preflight
    from retrack.config.spec import load_spec

    path = write_yaml(tmp_path, base_spec(env, tmp_path))
    assert CliRunner().invoke(app, ["validate", str(path)]).exit_code == 0
    pre = preflight(load_spec(path))
    assert pre.forget_ids == ["img-000001", "img-000002"]
    assert open_index(env / "index").manifest.dim == 64


def test_items_of_any_size_are_brought_to_the_models_geometry(env, tmp_path):
    """Neither a corpus of another size than the model's (its first item sets none), nor a mixed
    one, nor a picture of another size is refused: each item is resized and centre-cropped as it
    is read, the corpus delivered at the model's 8x8x1."""
    from pipelines.job import preflight
    from retrack.config.spec import load_spec

    digit = load_digits_u8()[0][0]
    big = encode_image(np.kron(digit, np.ones((2, 2), np.uint8)))  # 16x16: resizes back to the 8x8 original
    corpus = tmp_path / "corpus"
    shutil.copytree(env / "corpus", corpus)
    set_row(0, image=big)(corpus)
    set_row(5, image=encode_image(np.zeros((7, 9, 3), np.uint8)))(corpus)
    (tmp_path / "picture.png").write_bytes(big)
    spec = with_fields(base_spec(env, tmp_path), {"corpus.uri": str(corpus), "forget": {"images": [str(tmp_path / "picture.png")]}})
    pre = preflight(load_spec(write_yaml(tmp_path, spec)))
    assert pre.geometry == (8, 8, 1) and pre.corpus_index.source.image_shape == (8, 8, 1)
    assert [im.shape for im in pre.forget_images.images] == [(8, 8, 1)]
    assert np.array_equal(pre.forget_images.images[0][:, :, 0], digit)


def test_index_changed_after_the_job_recorded_it_is_refused(env, tmp_path):
    """The job's neighbours stage opens the index with the manifest digest its index stage
    recorded: an index rebuilt or edited in between is refused, a rebuild of the same inputs is not."""
    idx = tmp_path / "index"
    shutil.copytree(env / "index", idx)
    recorded = open_index(idx).manifest.content_digest()
    assert open_index(idx, manifest_digest=recorded).manifest.count == 64
    edit_json("manifest.json", skipped=7)(idx)
    with pytest.raises(RetrackError, match="does not match the digest recorded when the job built it"):
        open_index(idx, manifest_digest=recorded)
