"""Exploration (issue 16, item 3): do answers calibrate the confident picks?  Answers recorded with their
proposal-time probability; optionally N_AUDIT of each batch of 10 (from round 1) are a uniform sample of the
current picks with p >= 0.5 on the training micrographs ("audits").  Not in the package.

    python benchmarks/calibration_probe.py 10028 resnet16_u32 2 a2_28 061,062 311,312
    python benchmarks/calibration_probe_eval.py benchmarks/results/calibration_probe_a2_28.json
"""
import json
import sys

import numpy as np
sys.path.insert(0,'benchmarks')
from accuracy import DATASETS
from cryoal_ext.benchmark import BenchmarkSettings, load_data, _evaluate
from cryoal_ext.learner import ActiveLearner
from cryoal_ext.oracle import Oracle
from cryoal_ext.recipes import get_recipe
from cryoal_ext.calibration import held_out_logits
from cryoal_ext.acquisition import Proposal, peaks
from cryoal_ext.extract import sigmoid
from cryoal_ext.labels import Label
ds, fm, n_audit, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
splits = [s.split(',') for s in sys.argv[5:]]
s=BenchmarkSettings(**DATASETS[ds], feature_model=fm, cache_dir='/work/cache')
data=load_data(s, progress=lambda *_: None)
items, truth, shapes = data['items'], data['truth'], data['shapes']
names=sorted(items)
def audit(L, k, labels, rng):
    idx=L._label_index(labels); cands=[]
    for name,it in L.items.items():
        iy,ix,v=peaks(L.logits(name), L.radius_w(name), exclude=idx.get(name))
        keep=v>=0
        x,y=it.mic.frame.to_original(ix[keep],iy[keep])
        cands += [(name,float(a),float(b),float(sigmoid(z))) for a,b,z in zip(x,y,v[keep])]
    sel=rng.choice(len(cands), size=min(k,len(cands)), replace=False)
    return [Proposal(cands[i][0],cands[i][1],cands[i][2],cands[i][3],"audit") for i in sel]
out=[]
for sp in splits:
    train=[n for n in names if any(n.startswith(t) for t in sp)]; evals=[n for n in names if n not in train]
    L=ActiveLearner([items[n] for n in train], s.radius_px, get_recipe('default'), fm, seed=0)
    rng=np.random.default_rng(1)
    orc=Oracle(truth, s.radius_px, 'careful'); labels=[]; L.fit(labels); rnd=0; P=[]
    budgets={}
    while len(labels)<100:
        if L.model is None: props=L.initial_proposals(10, labels)
        else:
            a=audit(L, n_audit, labels, rng) if n_audit else []
            props=L.propose(10-len(a), labels+[Label(p.micrograph,p.x,p.y,0) for p in a])+a
        P += [(p.score, p.kind, rnd) for p in props]
        labels += orc.answer(props, rnd); L.fit(labels); rnd+=1
        if len(labels) in (25,50,100):
            evz=[]
            for n in evals:
                pk=L.picks(items[n].mic, items[n].fmap)
                evz.append(pk)
            ev=_evaluate(evz, truth, s, shapes)
            z,y,k=held_out_logits(L, labels)
            budgets[len(labels)]=dict(ap=ev.ap, scores=ev.scores.tolist(), tp=ev.tp.astype(int).tolist(), n_true=ev.n_true,
                z=z.tolist(), y=y.tolist(), pp=[p[0] for p in P], kind=[p[1] for p in P], rnd=[p[2] for p in P])
            print(sp, len(labels), 'AP %.3f'%ev.ap, flush=True)
    out.append(dict(train=train, budgets=budgets))
json.dump(out, open(f'benchmarks/results/calibration_probe_{tag}.json','w'))
