"""kt.student (`kt-student`): train and evaluate the small task model.

`finetune` trains any model (the foundation-model teacher or a small student) on a labeled subset; `distill`
(`kt-student train`) trains a student from a teacher cache, replaying every stored view through `stream` and never
loading the teacher (or, as the baseline, with the teacher online); both run through the one Accelerate loop in
`loop`, which also owns the run-folder policy (resume the same run, refuse another). `dataset` (`CacheDataset`)
gives a training loop of one's own the batches `kt-student train` trains on, checked and sharded the same way.
`losses` holds the objectives (KL on logits, contrastive on embeddings, cosine on patch grids), `data` the labeled
and evaluation loaders, `evaluate` the metrics, `segmentation` the data, loss and mIoU of `--task segmentation`,
`export` the device file (ONNX, parity checked under onnxruntime). The CLI (`cli`) only parses and prints. This
package depends on `kt` and on `kt.teacher_cache` through its reader only.
"""
