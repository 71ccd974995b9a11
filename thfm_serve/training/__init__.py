"""The THFM training recipe (`thfm train`).

THFM fine-tunes Wan2.1 into one forward pass at timestep 0 on synthetic humans:

* the clean video latent goes in, the timestep is 0, and the negated transformer output (-v) is
  the task's latent;
* dense targets (depth, normals, segmentation, densepose) are 3-channel images in [0, 1] encoded by
  the (frozen) Wan VAE like RGB video; the loss is L2 in latent space;
* sparse targets (2D and 3D keypoints) come from one learnable token per frame and MLP heads;
* the cached prompt embedding of each task selects the task, and a batch mixes tasks.

Modules: `data` (clips with ground truth in the renderer's layout -> model-grid tensors and targets),
`vae_stage` (stage 1, only for a preset without pretrained VAE weights: the Wan VAE trained as an
autoencoder on frames and task maps), `core_stage` (stage 2: the transformer fine-tune on cached
latents), `state` (checkpoints in the project's layout, resumable, safetensors only) and `trainer`
(the loop, progress bar and validation).
"""
