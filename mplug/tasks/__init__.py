"""Tasks and objectives on an MPLUG model: pretraining (ITC, ITM, MLM, prefix-LM, momentum distillation), inference,
fine-tuning (VQA, captioning, SCST, retrieval), classification (SNLI-VE, NLVR2), grounding and video."""
