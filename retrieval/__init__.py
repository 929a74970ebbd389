"""kt.retrieval (`kt-retrieve`): curate a task-related transfer set from a large gallery.

`embed` runs an encoder (an open_clip or timm model through `kt.models`) over gallery and query shards, or
imports embeddings computed elsewhere, or embeds class-name prompts; `embeddings` is the on-disk store those
write (sharded parts, consolidated in order, encoder fingerprints checked between queries and gallery); `index`
searches with faiss (exact blockwise Flat, or IVF-PQ with exact re-ranking); `curate` applies the guards and
the strategies (best-matches, query-balanced, random); `output` writes the manifest and webdataset shards. The
CLI (`cli`) only parses and prints. This package depends on `kt` alone.
"""
