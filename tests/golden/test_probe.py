"""Linear-probe feature extraction and the model's constants (README 7.7; case d): probe states and features,
the model's own states left alone, the positional encodings for H = 16 and 64, the unpatchify map."""

import numpy as np
import torch

from pcvit.inference import layer_scales, settle_states
from pcvit.model import patchify, positional_encoding, unpatchify
from pcvit.probe import extract_features

from .adapter import (assert_exact, assert_rel, assert_states_rel, config_from_meta, image_data, make_model,
                      model_for, states_from_npz, to_uint8)


def test_probe_states_after_constant_lr_inference(probe, implementation):
    npz, _ = probe
    config, model = model_for(probe, implementation)
    lr = config.hidden_lr_inference  # constant: no schedule, no warm-up
    final = settle_states(model, torch.as_tensor(npz["x"]), states_from_npz(npz), config.probe_steps, lambda t: lr,
                          config.hidden_momentum, config.h_grad_clip_norm, layer_scales(config))
    assert_states_rel(final, npz, "probe.step3.", 1e-4)


def test_probe_features_are_the_patch_mean_of_the_final_top_latent(probe, implementation):
    npz, _ = probe
    config, model = model_for(probe, implementation)
    images = to_uint8(npz["x"])
    data = image_data(images)
    assert_exact(data.normalise(torch.as_tensor(images)), npz["x"], "normalised probe batch")
    states = states_from_npz(npz)
    features = extract_features(model, states, torch.as_tensor(images), data, config)
    assert_rel(features, npz["probe.features"], 1e-4, "probe.features")
    for i, node in enumerate(states.as_list()):  # nothing is written back
        assert_exact(node, npz[f"h{i}"], f"model state h{i} after the probe")


def test_positional_encoding_h16_and_h64(probe, implementation):
    npz, meta = probe
    config = config_from_meta(meta, implementation)
    assert_rel(make_model(config).pos_embed, npz["pos_embed"], 1e-5, "pos_embed")
    assert_rel(positional_encoding(8, 16, 10000.0), npz["pos_embed"], 1e-5, "pos_embed")
    wide = make_model(config.replace(hidden_size=64))
    assert_rel(wide.pos_embed, npz["pos_embed_H64"], 1e-5, "pos_embed_H64")


def test_unpatchify_map_is_exact(probe):
    npz, _ = probe
    flat = torch.arange(64 * 48).reshape(1, 64, 48)  # output element p*48 + f carries its own flat index
    image = unpatchify(flat, channels=3, patch=4)[0]
    assert_exact(image.to(torch.int32), npz["unpatchify.src_index"], "unpatchify.src_index")
    assert_exact(patchify(image[None], 4), flat, "patchify inverts unpatchify")
    assert np.array_equal(np.sort(npz["unpatchify.src_index"].ravel()), np.arange(64 * 48))
