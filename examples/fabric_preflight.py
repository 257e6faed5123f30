"""memguard.preflight before ``fabric.setup``: the chosen precision goes through Fabric's own setting.

    python examples/fabric_preflight.py
"""

import torch
from lightning_fabric import Fabric
from torch import nn

import memguard

model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256))
batch = torch.randn(512, 256)

# about 14.7 MiB in float32 and 11.6 MiB under bf16 autocast on the CPU (with the 5% margin): a 13 MiB
# budget needs bf16-mixed
decision = memguard.preflight(model, batch, optimizer="adamw", device="cpu", budget="13MiB", policy="auto",
                              allow=["precision"])
fabric = Fabric(accelerator="cpu", devices=1, **decision.fabric_kwargs())  # e.g. precision="bf16-mixed"
model, optimizer = fabric.setup(model, torch.optim.AdamW(model.parameters()))
for step in range(3):
    loss = model(batch).float().pow(2).mean()
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
print(f"example: trained with precision={fabric.strategy.precision.precision}")
