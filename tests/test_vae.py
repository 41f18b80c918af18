"""The VAE wrapper on a tiny AutoencoderKL built from a config, and offline loading."""

import pytest
import torch
from diffusers import AutoencoderKL

from mdtzoo.data.toy import TINY_VAE_CONFIG as TINY  # the project's tiny VAE config, shared by tests
from mdtzoo.vae import (LATENT_SCALE, IdentityAutoencoder, LatentVAE, VAEWeightsNotFoundError, check_vae_available,
                        load_vae)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return AutoencoderKL(**TINY).eval()


def _images(B=2, size=16, seed=0):
    return torch.rand(B, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_returns_scaled_posterior_mean_and_std(tiny):
    vae = LatentVAE(tiny)
    x = _images()
    mean, std = vae.encode(x)
    assert mean.shape == std.shape == (2, 4, 8, 8) and vae.downsample == 2 and vae.latent_channels == 4
    with torch.no_grad():
        posterior = tiny.encode(x).latent_dist
    assert torch.allclose(mean, posterior.mean * 0.18215) and torch.allclose(std, posterior.std * 0.18215)
    assert vae.scale == LATENT_SCALE == 0.18215 and (std > 0).all()


def test_posterior_sample_is_deterministic_given_a_generator(tiny):
    vae = LatentVAE(tiny)
    x = _images()
    a = vae.sample(x, generator=torch.Generator().manual_seed(3))
    b = vae.sample(x, generator=torch.Generator().manual_seed(3))
    c = vae.sample(x, generator=torch.Generator().manual_seed(4))
    mean, std = vae.encode(x)
    z = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a, mean + std * z)


def test_decode_unscales_and_round_trips_shapes(tiny):
    vae = LatentVAE(tiny)
    x = _images()
    z = vae.sample(x, generator=torch.Generator().manual_seed(0))
    y = vae.decode(z)
    assert y.shape == x.shape and not y.requires_grad
    with torch.no_grad():
        assert torch.allclose(y, tiny.decode(z / 0.18215).sample)


def test_identity_autoencoder_has_the_same_interface():
    vae = load_vae(None)
    assert isinstance(vae, IdentityAutoencoder) and isinstance(load_vae("none"), IdentityAutoencoder)
    x = _images()
    mean, std = vae.encode(x)
    assert torch.equal(mean, x) and (std == 0).all() and torch.equal(vae.sample(x), x) and torch.equal(vae.decode(x), x)


def test_load_from_a_local_directory(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    x = _images()
    assert torch.allclose(vae.encode(x)[0], LatentVAE(tiny).encode(x)[0])


def test_load_from_the_hf_cache_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--stabilityai--sd-vae-ft-ema"
    commit = "0" * 40
    tiny.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    vae = load_vae("ema", cache_dir=tmp_path)
    x = _images()
    assert torch.allclose(vae.decode(vae.encode(x)[0]), LatentVAE(tiny).decode(LatentVAE(tiny).encode(x)[0]))
    check_vae_available("ema", cache_dir=tmp_path)  # found from the file tree as well
    check_vae_available(repo / "snapshots" / commit)
    check_vae_available("none")


@pytest.mark.parametrize("name,model_id", [("mse", "stabilityai/sd-vae-ft-mse"), ("sd-vae-ft-ema", "stabilityai/sd-vae-ft-ema"),
                                           ("stabilityai/sd-vae-ft-mse", "stabilityai/sd-vae-ft-mse")])
@pytest.mark.parametrize("find", [load_vae, check_vae_available])
def test_missing_weights_name_the_model_and_the_directory(tmp_path, name, model_id, find):
    """load_vae, and check_vae_available (a sweep's validation, from the file tree alone), name the
    model and the directory searched."""
    with pytest.raises(VAEWeightsNotFoundError) as err:
        find(name, cache_dir=tmp_path)
    message = str(err.value)
    assert model_id in message
    assert str(tmp_path / ("models--" + model_id.replace("/", "--"))) in message
    assert "huggingface-cli download" in message and "save_pretrained" in message


@pytest.mark.parametrize("find", [load_vae, check_vae_available])
def test_missing_local_directory_is_named(tmp_path, find):
    with pytest.raises(VAEWeightsNotFoundError, match=str(tmp_path / "nope")):
        find(tmp_path / "nope")
