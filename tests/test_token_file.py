"""A pre-tokenized token file (data.token_file): written once, read through a memmap, resume = offset."""
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from athanor.config import ConfigError
from athanor.data import TextDataConfig, open_text_data
from athanor.data.token_file import ensure_token_file, meta_path
from athanor.engine import read_metrics
from conftest import ROOT, run_recipe
from test_streaming import TINY, write_shards


def test_athanor_tokenize_writes_every_document_once(tmp_path):
    source, texts = write_shards(tmp_path / "c", n_shards=2, docs=30)
    out = tmp_path / "corpus.tokens"
    cmd = [sys.executable, "-m", "athanor.cli", "tokenize", str(out), "--data.source", str(source),
           "--data.streaming", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads(meta_path(out).read_text())
    expected = sum(len(t.encode()) + 1 for shard in texts for t in shard)  # bytes + one end-of-document token
    assert meta["tokens"] == expected and meta["dtype"] == "<u2" and meta["tokenizer"] == "bytes"
    tokens = np.memmap(out, dtype="<u2", mode="r")
    assert bytes(tokens[: len(texts[0][0].encode())].astype(np.uint8)) == texts[0][0].encode()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and "already written" in again.stderr.strip().splitlines()[-1]
    with pytest.raises(ConfigError, match="holds 'bytes' tokens"):
        TextDataConfig(token_file=str(out), tokenizer="gpt2").validate()


def test_written_once_under_the_lock_when_many_start_together(tmp_path):
    path, writes = tmp_path / "t.tokens", []

    def write():
        writes.append(1)
        time.sleep(0.3)  # the others arrive while this one writes
        from athanor.data.token_file import write_token_file

        write_token_file(path, [np.arange(100)], 256, "bytes")

    threads = [threading.Thread(target=ensure_token_file, args=(path, "bytes", write)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(writes) == 1 and json.loads(meta_path(path).read_text())["tokens"] == 100


def test_global_batches_do_not_depend_on_world_size_and_resume_at_the_offset(tmp_path):
    cfg = TextDataConfig(token_file=str(tmp_path / "s.tokens"), max_chars=50_000, block_size=16, batch_size=4)
    cfg.validate()
    data = open_text_data(cfg)  # written from the default corpus on first use
    whole = data.train_batches(8, 0)
    ranks = [data.train_batches(4, 0, r, 2) for r in range(2)]
    for _ in range(900):  # past two epochs (~380 global batches of 8 blocks each)
        assert (next(whole) == np.concatenate([next(ranks[0]), next(ranks[1])])).all()
    assert whole.epoch == 2
    position = json.loads(json.dumps(whole.state_dict()))
    expected = [next(whole) for _ in range(5)]
    resumed = data.train_batches(8, 0)
    resumed.load_state_dict(position)
    assert all((a == next(resumed)).all() for a in expected)
    tokens = np.memmap(cfg.token_file, dtype="<u2", mode="r")
    eval_start = len(tokens) - int(len(tokens) * 0.02)  # the last 2% are held out
    assert data.eval_blocks.shape == (8 * 4, 17)
    assert (data.eval_blocks[0].numpy() == tokens[eval_start:eval_start + 17]).all()


@pytest.mark.slow
def test_pretrain_on_a_token_file_resumes_exactly(tmp_path):
    source, _ = write_shards(tmp_path / "corpus", n_shards=2, docs=150)
    args = ["--data.source", str(source), "--data.streaming", "true", "--data.token_file",
            str(tmp_path / "corpus.tokens"), *TINY]
    full, split = tmp_path / "full", tmp_path / "split"
    run_recipe("pretrain", "--run.output_dir", str(full), "--run.max_steps", "20", *args)
    run_recipe("pretrain", "--run.output_dir", str(split), "--run.max_steps", "10", *args)
    run_recipe("pretrain", "--run.output_dir", str(split), "--run.max_steps", "20", *args)
    rows = [{r["step"]: r["loss"] for r in read_metrics(d) if "loss" in r} for d in (full, split)]
    assert rows[0] == rows[1] and len(rows[0]) == 20
    assert json.loads((split / "checkpoints" / "step-20" / "rank0" / "data.json").read_text())["index"] == 20
