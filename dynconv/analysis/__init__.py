"""Analysis tools that turn trained models into the papers' statistics and figures (not part of any operator):
KernelWarehouse's learnt attentions per warehouse (`kw_attention.py`, Figure 3)."""
