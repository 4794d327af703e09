"""`vqdm eval`: reference vs candidate models on held-out prompts: teacher-forced U-Net error,
latent/image PSNR and SSIM, CLIP/PickScore, FID (config, run, metrics, report, cli)."""
