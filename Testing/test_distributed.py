"""Data-parallel training: two gloo processes on the CPU end with identical weights."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from carlreg.train import TrainConfig, train
from conftest import monai_pairs_csv


def _rank_main(rank: int, world: int, store: str, pairs_csv: str, output: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        config = TrainConfig(
            data="pairs", data_folder=pairs_csv, modality="mr", input_shape=(40, 40, 40), width=0.125,
            batch_size=1, diffusion_steps=1, steps=1, checkpoint_every=1, validate_every=0, output=output,
        )
        model = train(config)
        torch.save(model.state_dict(), f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_hold_identical_weights(tmp_path):
    # the user's pairs: each rank reads them in a moment (the SynthSeg maps take seconds a process)
    pairs_csv = str(monai_pairs_csv(tmp_path))
    mp.spawn(
        _rank_main,
        args=(2, str(tmp_path / "store"), pairs_csv, str(tmp_path / "run"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    first = torch.load(tmp_path / "rank0.pt", weights_only=True)
    second = torch.load(tmp_path / "rank1.pt", weights_only=True)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    lines = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1  # rank 0 alone writes the log
    torch.manual_seed(0)
    from carlreg import build_carl

    untrained = build_carl(3, (40, 40, 40), width=0.125).state_dict()
    assert any(not torch.equal(first[name], untrained[name]) for name in first)
    assert all(torch.equal(first[name], saved[name]) for name in first)
