"""TRGE (arXiv 2508.07738): task-specific expert groups for continual learning of CLIP,
on the expert-parallel MoE core.  One file per idea: groups, intra_group, inter_group,
task_id, fusion, metrics; adapters/model plug the groups into dual encoders."""
