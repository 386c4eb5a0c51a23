"""The graphed sampling step: same samples as the plain loops for a seed (on
CPU the same buffers run eagerly; on CUDA the step is a replayed graph)."""

import pytest
import torch
from helpers import DEVICE

import adm_fast
from adm_fast.sampling.api import sample_images


def _models():
    torch.manual_seed(0)
    model = adm_fast.create_model(image_size=8, num_channels=32, num_res_blocks=1,
                                  channel_mult="1,2", attention_resolutions="4",
                                  learn_sigma=True, class_cond=True)
    for p in model.parameters():  # random output convs: the samples depend on the model
        p.data.add_(torch.randn_like(p) * 0.02)
    classifier = adm_fast.create_classifier(
        image_size=8, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
        classifier_attention_resolutions="4", classifier_use_scale_shift_norm=True,
        classifier_resblock_updown=True, classifier_pool="attention",
        classifier_channel_mult="1,2")
    return model.to(DEVICE).eval(), classifier.to(DEVICE).eval()


@pytest.mark.parametrize("loop, kw", [("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.5}),
                                      ("ddim_sample_loop", {})])
def test_graphed_loop_gives_the_plain_loops_samples(loop, kw):
    model, classifier = _models()
    diffusion = adm_fast.create_gaussian_diffusion(steps=100, learn_sigma=True,
                                                   timestep_respacing="12")
    cond_fn = adm_fast.classifier_cond_fn(classifier, 3.0)
    y = torch.tensor([1, 2, 7], device=DEVICE)
    runs = []
    for graphed in (False, True):
        torch.manual_seed(11)
        runs.append(getattr(diffusion, loop)(model, (3, 3, 8, 8), cond_fn=cond_fn,
                                             model_kwargs={"y": y}, cuda_graph=graphed, **kw))
    if DEVICE == "cpu":
        assert torch.equal(runs[0], runs[1])
    else:  # a replayed graph runs the same kernels; allow for reduction order only
        torch.testing.assert_close(runs[1], runs[0], rtol=1e-5, atol=1e-5)
    assert runs[0].abs().sum() > 0


def test_progressive_outputs_survive_later_steps():
    model, _ = _models()
    diffusion = adm_fast.create_gaussian_diffusion(steps=100, learn_sigma=True,
                                                   timestep_respacing="5")
    torch.manual_seed(3)
    kept = [o["sample"] for o in diffusion.p_sample_loop_progressive(
        model, (2, 3, 8, 8), model_kwargs={"y": torch.tensor([0, 1], device=DEVICE)},
        cuda_graph=True)]
    assert len({id(t) for t in kept}) == 5
    assert not torch.equal(kept[0], kept[-1])


def test_graphed_step_refuses_what_it_cannot_capture():
    model, _ = _models()
    diffusion = adm_fast.create_gaussian_diffusion(steps=100, learn_sigma=True,
                                                   timestep_respacing="5")
    with pytest.raises(ValueError, match="denoised_fn"):
        diffusion.p_sample_loop(model, (1, 3, 8, 8), denoised_fn=lambda x: x,
                                model_kwargs={"y": torch.tensor([0], device=DEVICE)},
                                cuda_graph=True)
    with pytest.raises(ValueError, match="dpm\\+\\+"):
        sample_images(model, diffusion, num_samples=1, batch_size=1, sampler="dpm++",
                      cuda_graph=True)


def test_sample_images_with_a_graph_matches_without():
    model, classifier = _models()
    diffusion = adm_fast.create_gaussian_diffusion(steps=100, learn_sigma=True,
                                                   timestep_respacing="6")
    kw = dict(num_samples=3, batch_size=2, classifier=classifier, classifier_scale=2.0, seed=4)
    plain, labels, _ = sample_images(model, diffusion, **kw)
    graphed, labels_g, _ = sample_images(model, diffusion, cuda_graph=True, **kw)
    assert (labels == labels_g).all()
    assert abs(plain.astype(int) - graphed.astype(int)).max() <= (0 if DEVICE == "cpu" else 1)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU refusal")
def test_cli_refuses_a_graph_without_cuda(capsys):
    import adm_fast.cli
    assert adm_fast.cli.main(["sample", "--cuda_graph", "--model_path", "missing.pt"]) == 2
    assert "--cuda_graph needs a CUDA device" in capsys.readouterr().err
