"""Names of the profiler ranges around the generator's work (`torch.profiler.record_function`).

A trace of the worker (`cosmos3-serve serve --profile-dir`) shows each denoising step and each VAE batch as one
range, on the host and, on CUDA, over the GPU kernels it launched; `bench/serving.py --profile` reads them.
"""

PROFILE_RANGES = {"denoise": "cosmos3::denoise_step", "encode": "cosmos3::vae_encode", "decode": "cosmos3::vae_decode",
                  "admit": "cosmos3::admit", "capture": "cosmos3::graph_capture"}  # admit holds the VAE encode
