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
import dataclasses
import json

from kt.config import add_config_args, build_config, explicit_bools
from kt.errors import cli_entry, print_json_line
from kt.retrieval import embed as E
from kt.retrieval.curate import CurateJob

PROG = "kt-retrieve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, cfg, fn, helptext in (
            ("embed", E.EmbedConfig, embed_command, "embed the images of webdataset shards"),
            ("import", E.ImportConfig, import_command, "import embeddings computed elsewhere (.npy + keys.txt)"),
            ("embed-text", E.EmbedTextConfig, embed_text_command,
             "per-class text queries from class names and prompt templates"),
            ("curate", CurateJob, curate_command, "select N gallery images for the queries")):
        sp = sub.add_parser(name, help=helptext)
        add_config_args(sp, cfg, skip=("ivfpq",))
        sp.set_defaults(fn=fn, cfg_class=cfg)
    return p


def embed_command(cfg: E.EmbedConfig) -> None:
    print_json_line(E.embed_images(**dataclasses.asdict(cfg)))  # one line per process: ranks share stdout


def import_command(cfg: E.ImportConfig) -> None:
    E.import_embeddings(**dataclasses.asdict(cfg))


def embed_text_command(cfg: E.EmbedTextConfig) -> None:
    E.embed_text(**dataclasses.asdict(cfg))


def curate_command(cfg: CurateJob) -> None:
    from kt.retrieval.curate import curate
    from kt.retrieval.embeddings import load_embeddings
    from kt.retrieval.output import check_out, write_outputs

    cfg.validate()  # before any store is opened: a typo fails fast
    check_out(cfg.out)  # likewise an --out that cannot take the result, before the search work
    queries = load_embeddings(cfg.queries)
    gallery = load_embeddings(cfg.gallery)
    exclude = load_embeddings(cfg.exclude) if cfg.exclude else None
    sel = curate(queries, gallery, cfg, exclude=exclude)
    summary = write_outputs(cfg.out, sel, queries, gallery, shards=cfg.shards, config=cfg)
    keys = ("strategy", "size", "gallery", "usable", "excluded", "query_copies", "duplicates", "k",
            "ivfpq_recall_at_10", "seconds")
    print(json.dumps({k: summary[k] for k in keys if k in summary}))


@cli_entry(PROG)
def main(argv=None) -> int:
    args = build_parser().parse_args(explicit_bools(argv))
    args.fn(build_config(args.cfg_class, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
