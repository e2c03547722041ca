"""The buffer: the file protocol between runtime_preprocessing.py (the Producer) and train.py (the BufferReader).

  module     job
  files      batch file names, atomic batch writes, recycling of consumed files, the refill plan
  protocol   the handshake files: progress file, manifest, heartbeat
  builder    Recipe (what decides a batch's bytes) and BatchBuilder (one batch from the transforms)
  workers    the producer's worker processes, each building whole batches with a BatchBuilder
  producer   the Producer loop: keeps up to buffer_size batches ready ahead of the trainer
  reader     the BufferReader: waits for batches in order, checks them, reports the trainer's position
Imports go files -> protocol -> builder -> workers -> producer, and files/protocol -> reader.

Every file in buffer_folder, the one statement of its invariants (all writes go through utils' atomic
helpers: a temp file renamed into place, so nothing half-written ever carries a real name):

  file                    writer            reader              invariant
  Y_<e>_<b>.npy           producer worker   trainer             int32 [B] labels; written first
  L_<e>_<b>.npy           producer worker   trainer             float32 [B, 3] PCA lighting coefficients
                                                                (the shift is computed on the trainer's
                                                                device: model/preprocessing.py); second
  X_<e>_<b>.npy           producer worker   trainer, producer   uint8 [B, crop, crop, 3]; written LAST, deleted
                                                                FIRST: a batch is complete iff its X exists
  .tmp-spare-*            producer          nobody              a consumed X renamed aside and overwritten in
                                                                place by the next X (rewriting pages a file
                                                                has is several times cheaper than allocating
                                                                new ones); batch files + spares <= buffer_size
  manifest.json           producer          trainer, producer   what the producer promises: run id, batch size,
                                                                crop size per epoch, dtype, seed, num_batches,
                                                                num_classes, dataset fingerprint, epoch range,
                                                                decoder and cached scales (kept or refused by
                                                                a restarted producer); batches on disk were
                                                                built under it
  producer.json           producer          trainer             heartbeat (pid, host, time, state, epoch range,
                                                                workers, max_workers, build_rate, sizing),
                                                                rewritten every few seconds while running
  training_progress.txt   trainer           producer            'epoch\\nbatch': the next batch the trainer
                                                                needs; everything before it is consumed

Epochs are absolute; batch b of epoch e holds positions b*B .. b*B+B-1 of that epoch's permutation
(data/sources/index.py: epoch_permutation); num_batches = N // B (the remainder is dropped, as the
original). At most buffer_size batches are on disk; every temp file is swept on start and exit. With W machines
(multi-worker training) worker w's buffer holds only rows [w*B/W, (w+1)*B/W) of each batch (B/W rows per file,
the same positions) and its manifest adds worker_slice [w, W]; B stays the global batch.

Restart: the producer removes its temp files and half-written batches, checks the manifest (same
settings: keeps the valid batches and continues, with the run's decoder and cached scales; different
run, batch size or crop, or a decoder or cached scale it cannot keep: refuses, or clears with
--clear_buffer), and follows the progress file clamped to [epoch_start, epoch_end].
It leaves no temp file or half-written batch behind when it stops.

Start order does not matter (two terminals, a launcher, a reboot):
- the progress file outlives runs, so a producer only believes the file it finds at start-up if it
  says (epoch_start, 0), or, with --epoch_start=auto, any position before epoch_end; otherwise it
  builds from epoch_start (auto: the first ready batch, else 0) until the trainer rewrites the file.
  The trainer's reader reports its position on its first read and again whenever it sees a producer
  it has not seen before, so a restarted producer catches up with a running trainer at once, and a
  trainer restarted at epoch E after a crash mid-epoch gets batches from (E, 0).
- the manifest also outlives its producer: the reader takes it once a live producer's heartbeat
  carries its run id (or it agrees with the trainer and batches are waiting); a disagreeing one
  from a producer that is not running is waited on (wait_timeout, with a warning) and refused
  only once a live producer stands behind it or the wait runs out.
"""
