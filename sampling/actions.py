"""The action modes of Cosmos 3, as the reference pipeline defines them (diffusers `CosmosActionCondition`).

- forward dynamics: first frame + actions + text -> video (the given actions stay clean),
- policy: first frame + text -> video + actions,
- inverse dynamics: video -> actions (every latent frame of the clip stays clean).

A request's clip is `chunk_size + 1` frames; its action chunk is `chunk_size` transitions of one embodiment,
whose name selects the rows of the domain-aware action heads and the width of its actions (`raw_action_dim`,
zero-padded to the checkpoint's `action_dim`). The clip is placed on a canvas: a resolution bin of the requested
tier, the one whose aspect ratio is closest to the clip's; the clip is downscaled (never upscaled) into it and
padded right and bottom. The generator sees only the latents of the content, not of the padding.
"""

from __future__ import annotations

SPATIAL_COMPRESSION = 16  # pixels per latent, in height and width (the Wan 2.2 VAE)
FORWARD_DYNAMICS, POLICY, INVERSE_DYNAMICS = "forward_dynamics", "policy", "inverse_dynamics"
ACTION_MODES = (FORWARD_DYNAMICS, POLICY, INVERSE_DYNAMICS)

# Embodiment -> row of the domain-aware action heads.
EMBODIMENT_DOMAIN_IDS = {
    "no_action": 0,
    "av": 1,
    "camera_pose": 2,
    "hand_pose": 3,
    "pusht": 4,
    "libero": 5,
    "umi": 6,
    "bridge_orig_lerobot": 7,
    "droid_lerobot": 8,
    "robomind-franka": 8,
    "galbot": 9,
    "robomind-franka-dual": 12,
    "robomind-ur": 13,
    "agibotworld": 15,
    "agibot_gear_gripper": 15,
    "agibot_gear_gripper_ext": 15,
    "fractal": 20,
}

# Embodiment -> width of its actions (sums of 9D poses, 1D grippers, 15D fingertips). Embodiments absent here
# (no_action, libero) have no fixed width and cannot run an action mode.
EMBODIMENT_ACTION_DIMS = {
    "av": 9,
    "camera_pose": 9,
    "pusht": 2,
    "umi": 10,
    "bridge_orig_lerobot": 10,
    "droid_lerobot": 10,
    "robomind-franka": 10,
    "robomind-franka-dual": 20,
    "robomind-ur": 10,
    "galbot": 30,
    "agibotworld": 29,
    "agibot_gear_gripper": 29,
    "agibot_gear_gripper_ext": 29,
    "fractal": 10,
    "hand_pose": 57,
}

# Resolution tier -> canvases (height, width); the one whose height / width ratio is closest to the clip's wins
# (the first one on a tie).
RESOLUTION_BINS: dict[int, tuple[tuple[int, int], ...]] = {
    256: ((256, 256), (256, 320), (320, 256), (192, 320), (320, 192)),
    480: ((640, 640), (544, 736), (736, 544), (480, 832), (832, 480)),
    704: ((960, 960), (832, 1088), (1088, 832), (704, 1280), (1280, 704)),
    720: ((960, 960), (832, 1104), (1104, 832), (720, 1280), (1280, 720)),
}

# Camera view point -> the framing sentence of the action caption (the model was trained on these sentences).
VIEW_POINT_FRAMING = {
    "ego_view": "This video is captured from a first-person perspective looking at the scene.",
    "third_person_view": "This video is captured from a third-person perspective looking towards the agent from the front.",
    "wrist_view": "This video is captured from a wrist-mounted camera.",
    "concat_view": "This video contains concatenated views from multiple camera perspectives.",
}


def action_source_size(frame_sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of an action clip's frames (PIL `(width, height)` sizes) as preprocessed: rounded down to
    multiples of the VAE's spatial compression."""
    width, height = frame_sizes[0]
    return height - height % SPATIAL_COMPRESSION, width - width % SPATIAL_COMPRESSION


def canvas_size(source_hw: tuple[int, int], tier: int) -> tuple[int, int]:
    """(height, width) of the tier's canvas whose aspect ratio is closest to `source_hw`'s."""
    ratio = source_hw[0] / source_hw[1]
    return min(RESOLUTION_BINS[tier], key=lambda hw: abs(hw[0] / hw[1] - ratio))


def content_size(frame_hw: tuple[int, int], canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of a frame placed on the canvas: downscaled to fit, never upscaled."""
    scale = min(canvas_hw[1] / frame_hw[1], canvas_hw[0] / frame_hw[0], 1.0)
    return max(1, int(scale * frame_hw[0] + 0.5)), max(1, int(scale * frame_hw[1] + 0.5))
