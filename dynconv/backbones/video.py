"""The registered backbones that take video clips (B, C, T, H, W) instead of images: R3D-18 (`r3d.py`) and the TSM
ResNets (`tsm.py`). They fit task=video only (dynconv/config.py refuses them elsewhere), and the image test
matrices leave them to tests/test_video_*.py (an image batch is no input for them). Each reports itself too
(`Backbone.takes_clips`); tests/test_video_backbones.py checks that this list and the registry agree."""

VIDEO_BACKBONES = ("r3d_18", "tsm_resnet18", "tsm_resnet50")
