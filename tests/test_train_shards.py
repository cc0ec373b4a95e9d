"""Training from webdataset shards (data.source: shards): a run end to end through
pretrain.run with DataLoader workers, evaluation on the embedded test sets, config checks."""

from __future__ import annotations

import pytest
import torch

import topoclip
from tests.helpers import QUIET_RUN, TINY_TOWERS
from topoclip.config import config_from_dict
from topoclip.data import make_shapes
from topoclip.data.shards import ShardStream, tensor_pairs_to_samples, write_shards
from topoclip.engine import ContrastiveTask, TrainingSettings
from topoclip.engine.trainer import Trainer
from topoclip.recipes import pretrain
from topoclip.runs import read_jsonl

pytest.importorskip("webdataset")

TINY = TINY_TOWERS + QUIET_RUN + [
    "model.image.img_size=32",
    "model.image.patch_size=8",
    "data.shapes.num_val=8",
    "data.shapes.num_test=24",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    train = make_shapes(num_train=64, num_val=8, num_test=8).split("train")
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(tensor_pairs_to_samples(train.images, train.captions), out, maxcount=8)
    assert len(paths) == 8
    return out


def test_run_trains_on_shards_and_evaluates_on_embedded_test_sets(tmp_path, shard_dir):
    cfg = config_from_dict({}, [
        *TINY,
        "data.source=shards",
        f"data.shards.urls={shard_dir}",
        "data.shards.epoch_length=64",
        "data.shards.shuffle_buffer=16",
        "train.steps=6",  # 4 batches per epoch: crosses into a second epoch
        "train.batch_size=16",
        "train.num_workers=2",
        "train.checkpoint_every=0",
        "eval.robustness=false",
        f"output.dir={tmp_path}",
        "output.name=shards",
    ])
    results = pretrain.run(cfg)
    assert results["train"]["steps"] == 6 and results["train"]["skipped_steps"] == 0
    log = read_jsonl(tmp_path / "shards" / "log.jsonl")
    assert [r["epoch"] for r in log] == [0, 0, 0, 0, 1, 1]
    assert set(results["eval"]["zeroshot"]) == {"shape", "colour", "size", "position"}
    assert "i2t_R@1" in results["eval"]["retrieval"]
    # The tokenizer was trained on the shards' captions: it knows their words.
    tokenizer = topoclip.data.TextTokenizer.load(tmp_path / "shards" / "tokenizer")
    assert tokenizer(["a small red circle"])["input_ids"].ne(tokenizer.pad_token_id).sum() >= 5


def test_a_stream_that_ends_early_is_an_error_not_a_short_epoch(tmp_path, shard_dir):
    # One shard, two DataLoader workers: the second worker has nothing to read, so the rank
    # would see half an epoch (and fall out of step with other ranks).
    cfg = config_from_dict({}, [*TINY, "train.steps=4", "train.batch_size=4", "train.num_workers=2", f"output.dir={tmp_path}"])
    topo = cfg.topology.build()
    stream = ShardStream(str(shard_dir / "shard-000000.tar"), epoch_length=8, batch_size=4, image_size=32, shuffle_buffer=0, rank=0, world=1)

    class Points(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(3, topo.dim)
            self.logit_scale = topoclip.LogitScale()

        def forward(self, images, input_ids, attention_mask):
            x = self.head(images.mean(dim=(2, 3)))
            return topo.project(x), topo.project(x + input_ids.float().mean())

    def collate(items):
        ids = torch.ones(len(items), 4, dtype=torch.long)
        return {"images": torch.stack([i for i, _ in items]), "input_ids": ids, "attention_mask": ids}

    trainer = Trainer(ContrastiveTask(Points(), topoclip.ContrastiveLoss(topo)), stream, collate, TrainingSettings.of(cfg), tmp_path / "run")
    assert trainer.batches_per_epoch == 2
    with pytest.raises(ValueError, match="stream ended after 1 of 2 batches"):
        trainer.fit()


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.source=shards", "data.shards.epoch_length=100"], "data.shards.urls: needed"),
        (["data.source=shards", "data.shards.urls=x"], "data.shards.epoch_length: not given, and no sizes.json"),
        (["data.source=shards", "data.shards.urls=x", "data.shards.epoch_length=10"], "less than one batch"),
        (["data.shards.shuffle_buffer=-1"], "data.shards.shuffle_buffer"),
        (["data.source=webdataset"], "data.source"),
    ],
)
def test_shard_config_errors_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({}, overrides)
