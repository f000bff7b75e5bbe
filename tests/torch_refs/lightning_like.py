"""Stand-ins for what a PyTorch Lightning `last.ckpt` pickles besides the weights (callbacks keyed by their class,
an AttributeDict of hyper-parameters, a config object, optimizer states), plus a pickle whose loading would call
a function: `lightning_checkpoint` builds such a checkpoint around a state dict. `CALLS` records any call, so a
test can prove that reading the weights ran none of this code."""

from __future__ import annotations

import os

import torch

CALLS: list[tuple] = []


def record(*args):
    CALLS.append(args)
    return args


class ModelCheckpoint:  # Lightning keys callback states by the callback class (PL 1.x)
    pass


class AttributeDict(dict):  # Lightning's hyper-parameter container: a dict subclass
    pass


class HParams:  # e.g. an OmegaConf DictConfig: a custom class instance with state
    def __init__(self):
        self.base_learning_rate = 4.5e-6
        self.ddconfig = {"ch": 128}

    def __setstate__(self, state):
        record("HParams.__setstate__", state)
        self.__dict__.update(state)


class CallsOnLoad:
    def __reduce__(self):
        return (record, ("CallsOnLoad loaded",))


class RunsAShell:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def lightning_checkpoint(state_dict: dict, path, dangerous: bool = False, legacy_format: bool = False) -> None:
    """torch.save a Lightning-style checkpoint holding `state_dict` and the extras above (in torch's zip format,
    or the pre-1.6 legacy format)."""
    params = [v for v in state_dict.values() if v.is_floating_point()][:2]
    ckpt = {
        "epoch": 7,
        "global_step": 250_123,
        "pytorch-lightning_version": "1.0.8",
        "state_dict": state_dict,
        "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
        "optimizer_states": [{"state": {i: {"exp_avg": torch.zeros_like(p), "step": 3} for i, p in enumerate(params)},
                              "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9), "params": [0, 1]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": AttributeDict(n_embed=64, ddconfig=HParams(), extra=[CallsOnLoad()]),
    }
    if dangerous:
        ckpt["callbacks"]["shell"] = RunsAShell()
    torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_format)
