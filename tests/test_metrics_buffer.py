"""Buffered metrics: rows are held back between flushes, and nothing is lost at a flush point
(close, which every exit of ``fit`` runs, and ``flush``, which the engine runs before a checkpoint)."""
from __future__ import annotations

import json

from athanor.engine import metrics
from athanor.engine.metrics import MetricsLogger, read_metrics


def test_rows_are_buffered_then_all_written_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    monkeypatch.setattr(metrics, "FLUSH_ROWS", 1000)
    logger = MetricsLogger(tmp_path, True, keep_up_to=0)
    for step in range(1, 6):
        logger.log(step, {"loss": 1.0 / step, "tokens_per_s": 10.0 * step, "bad": float("nan")})
    assert read_metrics(tmp_path) == []  # nothing written yet: one write per flush
    logger.flush()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2]["loss"] == 1.0 / 3 and rows[0]["bad"] == "nan"
    logger.log(6, {"loss": 0.1})
    logger.close()  # close flushes the rest
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert all(json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_the_row_limit_flushes(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    monkeypatch.setattr(metrics, "FLUSH_ROWS", 3)
    logger = MetricsLogger(tmp_path, True, keep_up_to=0)
    for step in range(1, 5):
        logger.log(step, {"loss": 1.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    logger.close()
    assert len(read_metrics(tmp_path)) == 4


def test_a_checkpoint_holds_every_line_of_its_steps(tmp_path, monkeypatch):
    """The engine flushes before each checkpoint: metrics.jsonl already has every step up to it."""
    import torch

    from athanor.config import TrainConfig
    from athanor.engine import Engine, Method

    monkeypatch.setattr(metrics, "FLUSH_SECONDS", 1e9)
    monkeypatch.setattr(metrics, "FLUSH_ROWS", 1000)
    seen = {}

    class Tiny(Method):
        def setup(self, engine):
            self.engine = engine
            self.model = engine.register("m", torch.nn.Linear(2, 1))

        def train_step(self, batch):
            if self.engine.step == 4:  # after the checkpoint of step 3
                seen["rows"] = [r["step"] for r in read_metrics(tmp_path)]
            loss = self.model(batch).pow(2).mean()
            self.engine.optimize("m", loss)
            return {"loss": loss.detach()}

    cfg = TrainConfig()
    cfg.run.output_dir, cfg.run.max_steps, cfg.run.save_every = str(tmp_path), 5, 3
    cfg.run.eval_every, cfg.run.log_every, cfg.run.progress = 0, 1, False
    engine = Engine(cfg)
    method = Tiny()
    method.setup(engine)
    engine.fit(method, iter(lambda: torch.ones(4, 2), None))
    assert seen["rows"] == [0, 1, 2, 3]  # step 0: the initial eval row
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
