"""The contract between export, serving, the client and the benchmarks: facts written down once.

Imports numpy and the package's errors only, never torch, so the gRPC client and `thfm perf` can
use it on a machine without PyTorch (tests/test_layering.py checks that).

    geometry    the Wan clip grid: 4n+1 frames, x8 latents, x16 pixels (one function per rule)
    tasks       task names, each task's output layout, `<task>.npz` keys
    protocol    model, tensor, parameter and file names of a THFM model repository
    specs       one spec per exported submodel (shapes, profiles, tolerances, dummy inputs)
    vae_window  running the fixed-window VAE graphs on shorter clips (pad, run, crop)
    windows     the one windowing policy: window plan, overlap, cross-fade stitching, the window loop
    params      the entry model's config parameters (grid, overlap, limits) and their one parser
"""
