"""``mdtzoo extract``: encode an image dataset once with the VAE into latent shards.

    mdtzoo extract --root /data/imagenet/train --out latents/in256 --vae mse --image-size 256
    torchrun --nproc-per-node 8 -m mdtzoo extract --root ... --out ...   # shards round-robin over ranks

Re-running the same command resumes: complete shards are skipped. See docs/data.md.
"""

from __future__ import annotations

import argparse

from mdtzoo.data.images import ON_CORRUPT


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("extract", help="encode an image dataset with the VAE into resumable latent shards")
    p.add_argument("--data", action="append", default=[], metavar="GIN", help="gin file(s) binding the dataset (e.g. datasets.image_folder.root)")
    p.add_argument("--gin", action="append", default=[], metavar="BINDING", help="extra gin binding")
    p.add_argument("--dataset", default="image_folder", help="registered dataset to encode (needs split='all'); default image_folder")
    p.add_argument("--root", help="image folder (overrides the gin binding)")
    p.add_argument("--out", required=True, help="output folder for meta.json and shard_*/")
    p.add_argument("--vae", required=True, metavar="PATH_OR_ID", help="'mse', 'ema', a hub id in the local cache, or a saved AutoencoderKL folder")
    p.add_argument("--image-size", type=int, help="pixel size (default: the dataset's, 256 for image_folder)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (the unit of resumption)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers decoding images")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="storage dtype of mean and std")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK if a GPU is present, else cpu")
    p.add_argument("--on-corrupt", choices=ON_CORRUPT, help="'error' (default) or 'skip' (implies --verify)")
    p.add_argument("--verify", action="store_true", help="decode every image of this rank before encoding anything")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(fn=run)
    return p


def run(args) -> int:
    from mdtzoo import config
    from mdtzoo.data.extract import default_device, extract_latents, rank_world
    from mdtzoo.registry import DATASETS
    from mdtzoo.vae import load_vae

    if args.data or args.gin:
        config.parse(args.data, args.gin)
    kwargs = {"split": "all", "flip": False}
    if args.root is not None:
        kwargs["root"] = args.root
    if args.image_size is not None:
        kwargs["image_size"] = args.image_size
    if args.on_corrupt is not None:
        kwargs["on_corrupt"] = args.on_corrupt
    dataset = DATASETS.build(args.dataset, **kwargs)
    rank, world = rank_world()
    vae = load_vae(args.vae, device=args.device or default_device())
    result = extract_latents(
        dataset, vae, args.out, vae_id=args.vae, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=args.workers, dtype=args.dtype, rank=rank, world_size=world,
        verify=args.verify or args.on_corrupt == "skip", progress=not args.quiet,
    )
    meta = result["meta"]
    print(
        f"rank {rank}/{world}: wrote {len(result['written'])} shard(s), skipped {len(result['skipped'])} complete; "
        f"{meta['count']} images in {meta['num_shards']} shards of latents {tuple(meta['latent_shape'])} -> {args.out}"
    )
    return 0
