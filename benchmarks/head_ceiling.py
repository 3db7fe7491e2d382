"""Is the linear head the limit? Ceiling of a small MLP head vs the BLR, both trained on every true
particle of the 2 training micrographs (as `cryoal benchmark --ceiling`), 5 splits.

    python benchmarks/head_ceiling.py 10028 32      # dataset, hidden units [, feature model: resnet16_u32]
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import accuracy as A
from cryoal_ext.benchmark import BenchmarkSettings, load_data, ceiling_labels, _evaluate
from cryoal_ext.learner import ActiveLearner
from cryoal_ext.recipes import get_recipe
from cryoal_ext.extract import extract_picks


torch.set_num_threads(2)
ds = sys.argv[1]
hidden = int(sys.argv[2]) if len(sys.argv) > 2 else 32
s = BenchmarkSettings(**A.DATASETS[ds], cache_dir=A.os.environ.get("CRYOAL_CACHE", "/tmp/fcache"),
                      feature_model=sys.argv[3] if len(sys.argv) > 3 else "resnet16_u32")  # as recorded
data = load_data(s, progress=lambda *_: None)
items, truth, shapes = data["items"], data["truth"], data["shapes"]
names = sorted(items)
res = []
for seed in range(5):
    rng = np.random.default_rng(seed)
    train = sorted(rng.choice(names, size=2, replace=False).tolist())
    evals = [n for n in names if n not in train]
    rng2 = np.random.default_rng(seed)
    labels = ceiling_labels([items[n] for n in train], truth, s.radius_px, rng2)
    L = ActiveLearner([items[n] for n in train], s.radius_px, get_recipe("default", pseudo_labels=0), seed=seed)
    X, y, w = L.training_set(labels)
    lin = L.fit(labels)
    ap_lin = _evaluate([extract_picks(n, lin.logit_map(items[n].fmap.features), items[n].mic.frame, s.radius_px) for n in evals], truth, s, shapes).ap
    Xt = torch.tensor(X); yt = torch.tensor(y, dtype=torch.float32); wt = torch.tensor(w / w.sum(), dtype=torch.float32)
    mu, sd = Xt.mean(0), Xt.std(0) + 1e-6
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(X.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(400):
        opt.zero_grad()
        z = net((Xt - mu) / sd).squeeze(1)
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, yt, reduction="none") * wt).sum()
        loss.backward()
        opt.step()
    picks = []
    with torch.no_grad():
        for n in evals:
            f = torch.tensor(np.asarray(items[n].fmap.features, np.float32))
            c, ny, nx = f.shape
            z = net(((f.reshape(c, -1).T) - mu) / sd).squeeze(1).reshape(ny, nx).numpy()
            picks.append(extract_picks(n, z, items[n].mic.frame, s.radius_px))
    ap_mlp = _evaluate(picks, truth, s, shapes).ap
    res.append((ap_lin, ap_mlp))
    print(seed, train, f"linear {ap_lin:.3f} mlp{hidden} {ap_mlp:.3f}", flush=True)
r = np.array(res); print(ds, "mean linear %.3f mlp %.3f" % tuple(r.mean(0)))
