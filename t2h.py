import torch, eplb, warnings
warnings.simplefilter("ignore")
w = torch.randint(0, 100, (3, 16)).double()
for kw in (dict(policy="hierarchical", num_nodes=2, num_groups=4), dict(policy="auto", num_nodes=2, num_groups=4)):
    a = eplb.plan(w, 32, 8, **kw); b = eplb.plan(w, 32, 8, gpu_speed=torch.full((8,), 3.0), **kw)
    print(kw, torch.equal(a.phy2log, b.phy2log), a.policy, b.policy)
prev = eplb.plan(w * 2, 32, 8)
a = eplb.plan(w, 32, 8, previous=prev, max_moves=4); b = eplb.plan(w, 32, 8, previous=prev, max_moves=4, gpu_speed=[2]*8)
print("previous", torch.equal(a.phy2log, b.phy2log))
try: b = eplb.plan(w, 32, 8, previous=prev, max_moves=4, gpu_speed=[2]*7+[2.0000001]); print("previous unequal ok")
except Exception as e: print("previous unequal ERR", e)
try: b = eplb.plan(w, 32, 8, num_nodes=2, dispatch="nearest", gpu_speed=[2]*8); print("nearest equal ok")
except Exception as e: print("nearest ERR", e)
# equal speeds as int tensor, numpy, list, -0? nan?
import numpy as np
for s in (np.full(8, 5), [1]*8, torch.ones(8, dtype=torch.int32), torch.ones(8, dtype=torch.float16)):
    try: print(type(s), torch.equal(eplb.plan(w, 32, 8, gpu_speed=s).phy2log, eplb.plan(w, 32, 8).phy2log))
    except Exception as e: print("ERR", e)
