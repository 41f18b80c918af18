"""Training on images encoded with a VAE on the fly; sampling decodes with the VAE the run recorded."""

import numpy as np
from diffusers import AutoencoderKL

from mdtzoo import config
from mdtzoo.data.toy import TINY_VAE_CONFIG
from mdtzoo.launch import cli
from mdtzoo.training import checkpoint as ckpt
from mdtzoo.training import train


def test_train_with_an_on_the_fly_vae_then_sample(tmp_path, capsys):
    vae_dir = tmp_path / "tiny_vae"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(vae_dir)
    run = tmp_path / "run"
    config.parse([], [
        "build.model = @models.mdt_xs2", f"train.run_dir = '{run}'", "train.dataset = 'datasets.relations'",
        "datasets.relations.image_size = 16", "datasets.relations.length = 32", "datasets.relations.heldout_size = 8",
        "train.steps = 2", "train.global_batch = 4", "train.progress = False", f"train.vae = '{vae_dir}'",
    ])
    assert train()["status"] == "done"
    state = ckpt.load(run / "checkpoints" / "ckpt_00000002.pt")
    # 16 px images through a 2x VAE with 4 latent channels -> an 8x8x4 model
    assert state["model_shape"] == {"input_size": 8, "in_channels": 4, "num_classes": 8}
    assert state["latent"] and state["vae"] == str(vae_dir)
    assert cli.main(["sample", str(run), "--npz", str(tmp_path / "s.npz"), "--num", "2", "--steps", "2"]) == 0
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8  # decoded back to pixels
