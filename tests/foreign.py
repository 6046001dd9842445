"""LightningModules that know nothing of deepplain, for testing the callbacks as users would."""
import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class ForeignMLP(L.LightningModule):
    def __init__(self, depth: int = 4, width: int = 32, inputs: int = 20, classes: int = 4, lr: float = 0.05):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Linear(inputs if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)
        self.lr = lr

    def forward(self, x):
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class ForeignCNN(ForeignMLP):
    def __init__(self, classes: int = 4, lr: float = 0.05):
        super().__init__(lr=lr, classes=classes)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(16, classes)


class FunctionalMLP(ForeignMLP):
    """Uses F.relu, so there is no activation module to hook: callbacks fall back to Linear outputs."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.out = nn.Linear(20, 16), nn.Linear(16, 16), nn.Linear(16, 4)
        del self.body, self.head

    def forward(self, x):
        return self.out(F.relu(self.l2(F.relu(self.l1(x)))))


def loaders(kind: str = "mlp", n: int = 128, batch_size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g) if kind == "mlp" else torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    ds = TensorDataset(x, y)
    return DataLoader(ds, batch_size=batch_size, shuffle=False), DataLoader(ds, batch_size=32)
