"""Training: the BertAdam optimizer, the shared loop (checkpoint/resume, DDP, logging) and the
three stages (BERT, LXMERT pretraining, fine-tuning). ``stages.run_stage(run_dir)`` is the entry."""
