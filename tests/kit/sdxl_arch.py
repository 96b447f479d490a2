"""The published SDXL base 1.0 architecture as config dicts (no weights): the UNet, both text
encoders and the VAE. Used to build SDXL-shaped models on the meta device, e.g. to check LoRA key
maps against every real layer name and shape, and by benchmarks that need full-size shapes."""

from __future__ import annotations

#: diffusers UNet2DConditionModel kwargs (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 10], attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)  # fmt: skip

#: transformers CLIPTextConfig kwargs: text_encoder (OpenAI CLIP ViT-L/14).
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # fmt: skip

#: transformers CLIPTextConfig kwargs: text_encoder_2 (OpenCLIP ViT-bigG/14).
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # fmt: skip

#: diffusers AutoencoderKL kwargs.
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
           down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32)  # fmt: skip
