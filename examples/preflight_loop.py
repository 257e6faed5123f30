"""memguard.preflight in a hand-written PyTorch loop: check before the first step and apply the plan.

    python examples/preflight_loop.py

On a GPU machine drop ``device`` and ``budget``: memguard reads the free memory of the GPU this process
will use. Here the CPU and a 100 MiB budget stand in for a small GPU.
"""

import torch
from torch import nn

import memguard


def make_model() -> nn.Module:
    layer = nn.TransformerEncoderLayer(128, 4, 512, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)  # no nested tensors with norm_first
    return nn.Sequential(nn.Embedding(512, 128), encoder, nn.Linear(128, 512))


def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    logits = model(batch)
    return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())


model = make_model()
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
batch = torch.randint(0, 512, (16, 128))

decision = memguard.preflight(model, batch, optimizer=optimizer, loss_fn=loss_fn, device="cpu", budget="100MiB",
                              policy="auto")
print(decision)  # the same report as `memguard check`

model, optimizer = decision.apply(model, optimizer)  # checkpointing, half weights or a new optimizer class
micro, accumulate = decision.micro_batch_size, decision.accumulate_grad_batches
for step in range(3):
    for i in range(accumulate):
        chunk = batch[i * micro:(i + 1) * micro]
        with decision.autocast():  # the chosen precision (a no-op for 32-true)
            loss = loss_fn(model, chunk) / accumulate
        loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    print(f"example: step {step}: loss {loss.item() * accumulate:.3f}")
