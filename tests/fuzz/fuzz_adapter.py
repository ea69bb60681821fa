"""memboost.train.qlora.load_adapter on the folder save_adapter wrote
(adapter_config.json + adapter_model.safetensors), one file replaced by
the fuzz input (mutate.FolderInputs)."""

import functools
import os

import torch
from torch import nn

from memboost import qlora

import mutate
import seeds as _seeds


@functools.lru_cache(maxsize=None)
def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 64))
    qlora.prepare_model(model, r=4, alpha=8, dropout=0.0, target_modules=["0", "2"])
    folder = os.path.join(_seeds.FOLDER, "adapter")
    qlora.save_adapter(model, folder)
    return model, mutate.FolderInputs(os.path.join(_seeds.FOLDER, "adapter-scratch"), [folder])


def seeds():
    return _setup()[1].seeds()


def target(data: bytes) -> None:
    model, folders = _setup()
    qlora.load_adapter(model, folders.apply(data))
    model(torch.randn(2, 64))
