"""Feature experiments for issue 3 (experiment only, not the package path): feature variants computed
here (views as 'tta8' = 8 rotations/mirrors, 'tta4' = quarter turns, 'flip2'; an extra earlier
backbone layer with EXTRA_LAYER=7; 'concat' = resnet16_u32 and resnet16_u64, 8 views each, prior
the mean of both heads), then the same 5-seed protocol as benchmarks/accuracy.py with --ceiling.
Features go to /tmp/fexp; results to /tmp/exp/res_<dataset>_<variant>.json (copied to
benchmarks/results/feature_screen_*.json, printed lines in feature_screen.txt).

    python benchmarks/feature_screen.py 10028 resnet16_u32:tta8 'default,default:l2=5'
    EXTRA_LAYER=7 python benchmarks/feature_screen.py 10028 resnet16_u32:tta8
    python benchmarks/feature_screen.py 10028 concat      # after the u32 and u64 tta8 runs

The package's '+viewsN' feature models (cryoal_ext/features.py) reproduce the tta8 numbers exactly
(benchmarks/results/accuracy_views8.json).
"""
import sys, os, time, json
from pathlib import Path
import numpy as np, torch
sys.path.insert(0, str(Path(__file__).resolve().parent))
import accuracy as A
from cryoal_ext import features as F, learner as LRN
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one
from cryoal_ext.learner import Item
from cryoal_ext.recipes import get_recipe

torch.set_num_threads(2)
ds, variant = sys.argv[1], sys.argv[2]
recipes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["default"]
seeds = [0, 1, 2, 3, 4]
OUT = Path("/tmp/fexp")

def dihedral(x, k, flip):  # x (..., H, W)
    if flip: x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, k, dims=(-2, -1))
def inv_dihedral(x, k, flip):
    x = torch.rot90(x, -k, dims=(-2, -1))
    if flip: x = torch.flip(x, dims=(-1,))
    return x

EXTRA = int(os.environ.get("EXTRA_LAYER", "0"))
def feats(img, name, ops):
    m = F.load_pretrained(name, "cpu")
    acc = None
    grab = {}
    if EXTRA:
        h = m.features.features[EXTRA].register_forward_hook(lambda mod, i, o: grab.__setitem__("z", o))
    with torch.inference_mode():
        t = torch.from_numpy(np.ascontiguousarray(img, np.float32))[None, None]
        for k, fl in ops:
            z = m.features(dihedral(t, k, fl))
            if EXTRA:
                e = grab["z"]; dy = (e.shape[-2] - z.shape[-2]) // 2; dx = (e.shape[-1] - z.shape[-1]) // 2
                e = e[..., dy:dy + z.shape[-2], dx:dx + z.shape[-1]]
                z = torch.cat([z, e], 1)
            z = inv_dihedral(z, k, fl)
            acc = z if acc is None else acc + z
        z = acc / len(ops)
        s = m.classifier(z[:, :128])
    if EXTRA: h.remove()
    return z[0].numpy().astype(np.float16), s[0, 0].numpy()

OPS = {"tta8": [(k, f) for f in (0, 1) for k in range(4)], "tta4": [(k, 0) for k in range(4)],
       "flip2": [(0, 0), (0, 1)], "tta1": [(0, 0)], "rot2": [(0, 0), (2, 0)]}

def variant_fmap(mic, variant):
    d = OUT / variant; d.mkdir(parents=True, exist_ok=True)
    fp, sp = d / f"{mic.name}.f.npy", d / f"{mic.name}.s.npy"
    if not fp.exists():
        base, tag = variant.split(":"); tag = tag.split("L")[0]
        f, s = feats(mic.image, base, OPS[tag])
        np.save(sp, s); np.save(fp, f)
    return F.FeatureMap(np.load(fp, mmap_mode="r"), np.load(sp))

s = BenchmarkSettings(**A.DATASETS[ds], budgets=(10, 25, 50, 100), batch=10, oracle="careful", ceiling=True,
                      cache_dir=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"),
                      feature_model=variant.split(":")[0] if variant != "concat" else "resnet16_u32")
data = load_data(s, progress=lambda *_: None)
if EXTRA:
    _h = F.head_of
    def head_pad(name):
        w, b = _h(name); return np.r_[w, np.zeros(64)], b
    LRN.head_of = head_pad
    variant = variant + f"L{EXTRA}"
t = time.perf_counter()
if variant == "concat":
    def cm(mic):
        a = variant_fmap(mic, "resnet16_u32:tta8"); b = variant_fmap(mic, "resnet16_u64:tta8")
        return F.FeatureMap(np.concatenate([np.asarray(a.features), np.asarray(b.features)], 0), 0.5 * (a.score + b.score))
    data["items"] = {n: Item(it.mic, cm(it.mic)) for n, it in data["items"].items()}
    _h = F.head_of
    def head_cat(name):
        w1, b1 = _h("resnet16_u32"); w2, b2 = _h("resnet16_u64"); return 0.5 * np.r_[w1, w2], 0.5 * (b1 + b2)
    LRN.head_of = head_cat
elif ":" in variant:
    data["items"] = {n: Item(it.mic, variant_fmap(it.mic, variant)) for n, it in data["items"].items()}
print(f"features {time.perf_counter()-t:.0f}s", flush=True)
res = {}
for rn in recipes:
    base, *pairs = rn.split(":")
    over = {p.split("=")[0]: json.loads(p.split("=")[1]) for p in pairs}
    recipe = get_recipe(base, **over)
    runs = [run_one(s, recipe, sd, data, progress=lambda *_: None) for sd in seeds]
    b = np.array([r["baseline"]["ap"] for r in runs]); aps = np.array([[x["ap"] for x in r["active"]] for r in runs])
    c = np.array([r["ceiling"]["ap"] for r in runs])
    print(f"{ds} {variant} {rn}: base {b.mean():.3f} | " + " ".join(f"{m:.3f}/{g:+.3f}" for m, g in zip(aps.mean(0), (aps - b[:, None]).min(0)))
          + f" | ceiling {c.mean():.3f} | per-seed@100 {np.round(aps[:, -1], 3).tolist()}", flush=True)
    res[rn] = runs
json.dump(res, open(f"/tmp/exp/res_{ds}_{variant.replace(':','_')}.json", "w"))
