"""Calibration variants on calibration_probe.py output (issue 16, item 3; exploration, not in the package).

raw, held-out Platt, proposal-time Platt, a purity ceiling, the audit precision ratio, an intercept
shift from the audits.  E/T = sum of p over picks / true count; dF1 = best F1 - F1 at the suggested
threshold.

    python benchmarks/calibration_probe_eval.py benchmarks/results/calibration_probe_a2_28.json
"""
import json
import sys

import numpy as np

from cryoal_ext.calibration import platt, CalibrationSettings
def lg(p): p=np.clip(np.asarray(p,float),1e-6,1-1e-6); return np.log(p/(1-p))
def sig(z): return 1/(1+np.exp(-z))
def sugg(s):
    s=np.sort(s)[::-1]; f=2*np.cumsum(s)/(np.arange(1,s.size+1)+s.sum()); return s[np.argmax(f)]
def stats(p, tp, nt):
    order=np.argsort(-p); p=p[order]; tp=tp[order]
    t=sugg(p); k=p>=t; TP=tp[k].sum(); f1=2*TP/(k.sum()+nt)
    best=np.max(2*np.cumsum(tp)/(np.arange(1,tp.size+1)+nt))
    return p.sum()/nt, f1, best
for f in sys.argv[1:]:
    for run in json.load(open(f)):
        for b,d in run['budgets'].items():
            sc=np.array(d['scores']); tp=np.array(d['tp'],bool); nt=d['n_true']; z=lg(sc)
            hz=np.array(d['z']); y=np.array(d['y']); pp=np.array(d['pp']); kind=np.array(d['kind'])
            res={'raw':(1,0)}
            c=platt(hz,y); res['heldout']=(c.a,c.b)
            c=platt(lg(pp),y); res['preq']=(c.a,c.b)
            au=kind=='audit'
            if au.sum()>=3:
                c=platt(lg(pp[au]),y[au], CalibrationSettings(min_answers=3)); res['preq_audit']=(c.a,c.b)
                w=~au
            line=[f"{f.split('_')[-2]} {run['train'][0][:3]},{run['train'][1][:3]} @{b} AP {d['ap']:.3f} n_au {au.sum()} prec_au {y[au].mean() if au.any() else np.nan:.2f}"]
            for k,(a,bb) in res.items():
                r,f1,best=stats(sig(a*z+bb),tp,nt); line.append(f"{k}: a{a:.2f} b{bb:+.2f} E/T {r:.2f} dF1 {best-f1:.3f}")
            print(" | ".join(line))

from scipy.optimize import minimize
def ceil_fit(z, y, sd=1.0, c_prior=(1.0, 1.0)):
    # p = c * sigmoid(a z + b); prior N(1,sd) on a, N(0,sd) on b, Beta on c
    def obj(t):
        a,b,c=t; p=np.clip(c*sig(a*z+b),1e-9,1-1e-9)
        return -np.sum(y*np.log(p)+(1-y)*np.log(1-p)) + 0.5*((a-1)**2+b**2)/sd**2 - (c_prior[0]-1)*np.log(c) - (c_prior[1]-1)*np.log(1-c+1e-12)
    r=minimize(obj,[1,0,0.95],method='L-BFGS-B',bounds=[(0.05,10),(-10,10),(0.05,1.0)])
    return r.x
if __name__=='__main__':
    print('--- ceiling model, prequential z')
    for f in sys.argv[1:]:
        for run in json.load(open(f)):
            for b,d in run['budgets'].items():
                sc=np.array(d['scores']); tp=np.array(d['tp'],bool); nt=d['n_true']; z=lg(sc)
                y=np.array(d['y']); pp=np.array(d['pp']); kind=np.array(d['kind']); hz=np.array(d['z'])
                out=[f"{f.split('_')[-2]} {run['train'][0][:3]},{run['train'][1][:3]} @{b}"]
                for nm,zz in (('preq',lg(pp)),('held',hz)):
                    a,bb,c=ceil_fit(zz,y)
                    r,f1,best=stats(c*sig(a*z+bb),tp,nt); out.append(f"{nm}: a{a:.2f} b{bb:+.2f} c{c:.2f} E/T {r:.2f} dF1 {best-f1:.3f}")
                # oracle: what c would make E/T=1 with raw probs
                out.append(f"needed c {nt/sc.sum():.2f}")
                print(" | ".join(out))
    print('--- audit ratio')
    for f in sys.argv[1:]:
        for run in json.load(open(f)):
            for b,d in run['budgets'].items():
                sc=np.array(d['scores']); tp=np.array(d['tp'],bool); nt=d['n_true']; z=lg(sc)
                y=np.array(d['y']); pp=np.array(d['pp']); kind=np.array(d['kind']); au=kind=='audit'
                s=(y[au].sum()+1)/(pp[au].sum()+1)
                r,f1,best=stats(np.clip(sc*s,0,1),tp,nt)
                c=platt(np.array(d['z']),y); pz=sig(c.a*z+c.b); s2=(y[au].sum()+1)/(sig(c.a*lg(pp[au])+c.b).sum()+1)
                r2,f12,_=stats(np.clip(pz*s2,0,1),tp,nt)
                print(f"{run['train'][0][:3]},{run['train'][1][:3]} @{b} audits {au.sum()} s {s:.2f} E/T {r:.2f} dF1 {best-f1:.3f} | heldout+ratio s {s2:.2f} E/T {r2:.2f} dF1 {best-f12:.3f} | mean raw p audits {pp[au].mean():.2f}")
    print('--- intercept shift from audits')
    from scipy.optimize import brentq
    for f in sys.argv[1:]:
        for run in json.load(open(f)):
            for b,d in run['budgets'].items():
                sc=np.array(d['scores']); tp=np.array(d['tp'],bool); nt=d['n_true']; z=lg(sc)
                y=np.array(d['y']); pp=np.array(d['pp']); kind=np.array(d['kind']); au=kind=='audit'
                if not au.any():
                    continue
                out=[f"{run['train'][0][:3]},{run['train'][1][:3]} @{b}"]
                for nm,(a,b0) in (('raw',(1.0,0.0)),('held',(lambda c:(c.a,c.b))(platt(np.array(d['z']),y)))):
                    za=a*lg(pp[au])+b0; target=(y[au].sum()+0.5)/(au.sum()+1)
                    db=brentq(lambda t: sig(za+t).mean()-target,-20,20)
                    r,f1,best=stats(sig(a*z+b0+db),tp,nt); out.append(f"{nm}: db {db:+.2f} E/T {r:.2f} dF1 {best-f1:.3f}")
                print(" | ".join(out))
