"""`retrack unlearn` refuses bad input with a specific message and exit code 2, before training,
and writes nothing a later run could take for an output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.cli import app
from retrack.embedded.benchmark import build_benchmark, load_digits_u8
from retrack.data.forget import read_forget_ids


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    images, labels = load_digits_u8()
    build_benchmark(root, images[:200], labels[:200], name="mini", copy_fraction=0.05)
    return root, model_dir


def invoke(setup, tmp_path, **overrides):
    root, model = setup
    args = {
        "--model": str(model),
        "--corpus": str(root / "corpus"),
        "--forget-ids": str(root / "forget_ids.txt"),
        "--out": str(tmp_path / "out"),
        "--steps": "1",
        "--batch-size": "4",
    }
    args.update(overrides)
    flat = ["unlearn"] + [x for kv in args.items() for x in kv]
    result = CliRunner().invoke(app, flat)
    return result, tmp_path / "out"


def write_ids(tmp_path, ids):
    p = tmp_path / "ids.txt"
    p.write_text("\n".join(ids) + "\n")
    return str(p)


def refused(result, out, pattern):
    assert result.exit_code == 2, result.output
    assert pattern in result.output, result.output
    assert not out.exists()


def test_good_input_trains_and_writes_a_model(setup, tmp_path):
    result, out = invoke(setup, tmp_path)
    assert result.exit_code == 0, result.output
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_unknown_forget_id(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--forget-ids": write_ids(tmp_path, ["img-000001", "no-such-id"])}), "not in the corpus")


def test_duplicated_forget_id(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--forget-ids": write_ids(tmp_path, ["img-000001", "img-000001"])}), "more than once")


def test_empty_forget_set(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--forget-ids": write_ids(tmp_path, ["# nothing"])}), "forget set is empty")


@pytest.mark.parametrize("lam", ["-0.1", "1.5"])
def test_lambda_outside_unit_interval(setup, tmp_path, lam):
    refused(*invoke(setup, tmp_path, **{"--params": json.dumps({"lambda": float(lam)})}), "lambda")


def test_k_below_one(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--params": '{"k": 0}'}), "k: Input should be greater than or equal to 1")


def test_k_larger_than_retained_set(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--params": '{"k": 100000}'}), "larger than the retained set")


def test_unknown_method(setup, tmp_path):
    refused(*invoke(setup, tmp_path, **{"--method": "forgetit"}), "unknown method 'forgetit'")


def test_model_dir_that_is_not_a_unet(setup, tmp_path):
    root, model = setup
    bad = tmp_path / "bad_model"
    shutil.copytree(model, bad)
    cfg = json.loads((bad / "unet" / "config.json").read_text())
    cfg["_class_name"] = "AutoencoderKL"
    (bad / "unet" / "config.json").write_text(json.dumps(cfg))
    refused(*invoke(setup, tmp_path, **{"--model": str(bad)}), "expected a diffusers UNet2DModel")


def test_model_dir_with_pickle_weights_only(setup, tmp_path):
    root, model = setup
    bad = tmp_path / "pickled"
    shutil.copytree(model, bad)
    w = bad / "unet" / "diffusion_pytorch_model.safetensors"
    w.rename(w.with_suffix(".bin"))
    refused(*invoke(setup, tmp_path, **{"--model": str(bad)}), "only safetensors weights are loaded")


def test_corrupt_image_in_corpus(setup, tmp_path):
    root, _ = setup
    corpus = tmp_path / "corpus"
    shutil.copytree(root / "corpus", corpus)
    shard = sorted(corpus.glob("*.parquet"))[0]
    table = pq.read_table(shard).to_pylist()
    table[3]["image"] = b"\x89PNG\r\n\x1a\n garbage"
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(shard)), shard)
    refused(*invoke(setup, tmp_path, **{"--corpus": str(corpus)}), f"item {table[3]['id']!r}: image bytes cannot be decoded")


def test_console_script_exits_non_zero(setup, tmp_path):
    root, model = setup
    ids = write_ids(tmp_path, read_forget_ids(root / "forget_ids.txt")[:1] * 2)
    exe = Path(sys.executable).with_name("retrack")
    proc = subprocess.run(
        [str(exe), "unlearn", "--model", str(model), "--corpus", str(root / "corpus"), "--forget-ids", ids, "--out", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "listed more than once" in proc.stderr and "Traceback" not in proc.stderr
