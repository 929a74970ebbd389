"""kt-retrieve: embed a gallery and queries, then curate a transfer set from the gallery.

    kt-retrieve embed --encoder open_clip:ViT-L-14@openai --data 'gallery/{000..099}.tar' --out gallery.emb
    accelerate launch --multi_gpu --num_processes 8 -m kt.retrieval.cli embed ...   # ranks take disjoint shards
    kt-retrieve embed --encoder open_clip:ViT-L-14@openai --data labeled/ --out queries.emb
    kt-retrieve import --embeddings img_emb.npy --keys keys.txt --encoder open_clip:ViT-L-14@openai --out g.emb
    kt-retrieve embed-text --encoder open_clip:ViT-L-14@openai --classes classes.json --templates imagenet --out q.emb
    kt-retrieve curate --queries queries.emb --gallery gallery.emb --strategy query-balanced --size 100000 \
        --seed 0 --exclude test.emb --out transfer/
"""

from __future__ import annotations

import argparse
import json

from kt.errors import cli_entry, print_json_line
from kt.retrieval import embed as E
from kt.retrieval.curate import INDEXES, STRATEGIES, CurateConfig
from kt.retrieval.index import IVFPQConfig

PROG = "kt-retrieve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="embed the images of webdataset shards")
    e.add_argument("--encoder", default=E.DEFAULT_ENCODER, help="a kt model name (timm or open_clip:ARCH@TAG)")
    e.add_argument("--pretrained", default="hub", help="none | package | hub | PATH (see kt.models)")
    e.add_argument("--data", required=True, help="shard spec: files, {a..b} braces, a directory, '::'-joined")
    e.add_argument("--out", required=True, help="embedding store to write")
    e.add_argument("--image-size", type=int, default=224)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--no-normalize", dest="normalize", action="store_false", help="keep raw feature norms")
    e.add_argument("--resume", action="store_true", help="continue a store at its first unfinished shard")
    e.add_argument("--device", default="auto", help="auto (accelerate's device for this process) | cpu | cuda")
    e.set_defaults(fn=embed_command)

    i = sub.add_parser("import", help="import embeddings computed elsewhere (.npy + keys.txt)")
    i.add_argument("--embeddings", required=True, help="(N, D) .npy file")
    i.add_argument("--keys", required=True, help="text file, one key per line in row order")
    i.add_argument("--encoder", required=True, help="the encoder that made them (checked against the queries)")
    i.add_argument("--pretrained", default="hub", help="its weights source, as for embed")
    i.add_argument("--normalize", action="store_true", help="L2-normalise the rows on import")
    i.add_argument("--out", required=True)
    i.set_defaults(fn=import_command)

    t = sub.add_parser("embed-text", help="per-class text queries from class names and prompt templates")
    t.add_argument("--encoder", default=E.DEFAULT_ENCODER, help="open_clip:ARCH@TAG")
    t.add_argument("--pretrained", default="hub", help="none | hub | PATH of an open_clip checkpoint")
    t.add_argument("--classes", required=True, help="JSON: list of names, {'classes': [...]} or {index: name}")
    t.add_argument("--templates", default="imagenet", help="imagenet | simple | a file with one '{}' template per line")
    t.add_argument("--out", required=True)
    t.add_argument("--device", default="cpu")
    t.set_defaults(fn=embed_text_command)

    c = sub.add_parser("curate", help="select N gallery images for the queries")
    d = CurateConfig()
    c.add_argument("--queries", required=True, help="embedding store of the labeled images or class prompts")
    c.add_argument("--gallery", required=True, help="embedding store of the candidate images")
    c.add_argument("--strategy", default=d.strategy, help=f"one of: {', '.join(STRATEGIES)}")
    c.add_argument("--size", type=int, required=True, help="N, images in the transfer set")
    c.add_argument("--seed", type=int, default=d.seed)
    c.add_argument("--out", required=True, help="output directory")
    c.add_argument("--exclude", default=None, help="embedding store whose near-duplicates are dropped (the test set)")
    c.add_argument("--exclude-threshold", type=float, default=d.exclude_threshold, help="Euclidean distance")
    c.add_argument("--copy-threshold", type=float, default=d.copy_threshold,
                   help="gallery rows this close to a query are its copies and dropped")
    c.add_argument("--block-size", type=int, default=d.block_size, help="gallery rows in memory at once")
    c.add_argument("--index", default=d.index, help=f"one of: {', '.join(INDEXES)}")
    c.add_argument("--nlist", type=int, default=IVFPQConfig.nlist)
    c.add_argument("--pq-m", type=int, default=IVFPQConfig.pq_m)
    c.add_argument("--nprobe", type=int, default=IVFPQConfig.nprobe)
    c.add_argument("--rerank", type=int, default=IVFPQConfig.rerank,
                   help="IVF-PQ candidates per neighbour re-ranked by exact distance (1: none)")
    c.add_argument("--device", default=d.device, help="auto | cpu | gpu (faiss)")
    c.add_argument("--no-shards", dest="shards", action="store_false", help="write the manifest only")
    c.set_defaults(fn=curate_command)
    return p


def embed_command(args) -> None:
    summary = E.embed_images(args.encoder, args.data, args.out, pretrained=args.pretrained, image_size=args.image_size,
                   batch_size=args.batch_size, normalize=args.normalize, resume=args.resume, device=args.device)
    print_json_line(summary)  # one line per process: ranks share stdout


def import_command(args) -> None:
    E.import_embeddings(args.embeddings, args.keys, args.encoder, args.out, pretrained=args.pretrained,
                        normalize=args.normalize)


def embed_text_command(args) -> None:
    E.embed_text(args.encoder, args.classes, args.out, templates=args.templates, pretrained=args.pretrained,
                 device=args.device)


def curate_command(args) -> None:
    from kt.retrieval.curate import curate
    from kt.retrieval.output import write_outputs
    from kt.retrieval.embeddings import load_embeddings

    cfg = CurateConfig(strategy=args.strategy, size=args.size, seed=args.seed, block_size=args.block_size,
                       exclude_threshold=args.exclude_threshold, copy_threshold=args.copy_threshold,
                       index=args.index, device=args.device,
                       ivfpq=IVFPQConfig(nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe,
                                         rerank=args.rerank))
    cfg.validate()  # before any store is opened: a typo fails fast
    queries = load_embeddings(args.queries)
    gallery = load_embeddings(args.gallery)
    exclude = load_embeddings(args.exclude) if args.exclude else None
    sel = curate(queries, gallery, cfg, exclude=exclude)
    summary = write_outputs(args.out, sel, queries, gallery, shards=args.shards)
    keys = ("strategy", "size", "gallery", "usable", "excluded", "query_copies", "duplicates", "k",
            "ivfpq_recall_at_10", "seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))


@cli_entry(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
