"""fastscore.graphs: the one CUDA-graph warm-up and capture of training and sampling."""
import pytest
import torch

from fastscore import graphs


def test_graphs_are_possible_on_cuda_devices_only():
    assert graphs.possible(torch.device("cuda", 0)) and graphs.possible(torch.device("cuda"))
    assert not graphs.possible(torch.device("cpu")) and not graphs.possible(torch.device("meta"))


@pytest.mark.gpu
def test_a_captured_function_replays_on_its_buffers_and_advances_a_registered_generator():
    dev = torch.device("cuda")
    x = torch.zeros(1000, device=dev)
    gen = torch.Generator(dev).manual_seed(5)
    noise = torch.empty_like(x)

    def step():
        noise.normal_(generator=gen)
        x.add_(noise)

    graphs.warm_up(step, dev)
    after_warm_up = x.clone()
    replay = graphs.capture(step, dev, generators=[gen])
    torch.cuda.synchronize()
    assert torch.equal(x, after_warm_up)           # capture records, it does not run
    draws = []
    for _ in range(3):
        before = x.clone()
        replay()
        draws.append(x - before)
    torch.cuda.synchronize()
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])   # fresh draws per replay
    # consecutive draws of the generator's own stream (whether capture itself used one is torch's business)
    reference = torch.Generator(dev).manual_seed(5)
    stream = [torch.randn(1000, device=dev, generator=reference) for _ in range(6)]
    first = [k for k in range(1, 4) if torch.allclose(draws[0], stream[k], atol=1e-5)]
    assert first, "the first replay's draw is none of the stream's draws 1..3"
    for d, e in zip(draws, stream[first[0]:]):
        assert torch.allclose(d, e, atol=1e-5)
