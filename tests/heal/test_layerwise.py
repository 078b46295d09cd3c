"""Layer-wise initialisation fits each attention block to the teacher's on the teacher's inputs."""

import torch

from heal.helpers import mla_config, perturbed, random_model, random_windows
from mlakit.heal.distill import HealOptions, heal_model, load_state
from mlakit.heal.layerwise import layerwise_init


def test_every_layer_gets_closer_to_the_teacher():
    teacher = random_model(mla_config(n_layers=3))
    student = perturbed(teacher, scale=0.5)
    options = HealOptions(tokens=4 * 32, batch_size=4, seq_len=32, layerwise_steps=60, layerwise_lr=1e-2,
                          layerwise_windows=8, train="attention", progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = layerwise_init(student, teacher, random_windows(8, 32), options, log=lambda *_: None)
    assert len(result["before"]) == 3 and result["restored"] == []
    for b, a in zip(result["before"], result["after"]):
        assert a < 0.3 * b, result
    moved = {k for k, v in student.state_dict().items() if not torch.equal(v, before[k])}
    assert moved and all(".attention." in k for k in moved)  # nothing outside attention moves


def test_a_layer_the_fit_makes_worse_keeps_its_weights():
    teacher = random_model(mla_config(n_layers=3))
    student = perturbed(teacher, scale=0.5)
    # lr 10 throws every AdamW step far off: each fit ends worse than it started
    options = HealOptions(tokens=4 * 32, batch_size=4, seq_len=32, layerwise_steps=3, layerwise_lr=10.0,
                          layerwise_windows=8, train="attention", progress=False)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    result = layerwise_init(student, teacher, random_windows(8, 32), options, log=lambda *_: None)
    assert result["restored"] == [0, 1, 2]
    assert result["after"] == result["before"]
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_mla_set_leaves_wo_alone_and_resume_skips_the_layerwise_phase(tmp_path):
    teacher = random_model(mla_config())
    student = perturbed(teacher)
    options = HealOptions(tokens=3 * 4 * 32, batch_size=4, seq_len=32, layerwise_steps=5, layerwise_windows=8,
                          train="mla", progress=False, max_minutes=0)
    wo = student.layers[0].attention.wo.weight.clone()
    heal_model(student, teacher, random_windows(20, 32), options, tmp_path, log=lambda *_: None)
    assert torch.equal(student.layers[0].attention.wo.weight, wo)
    state = load_state(tmp_path)
    assert state["log"]["layerwise"]["steps"] == 5 and state["step"] == 1
