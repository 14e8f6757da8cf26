"""The tools behind the ``densenet-efficient`` command: train, evaluate, data, bench, plan, memory accounting.

They know the core and the pretrained layer; nothing below imports them. Their extra dependencies
(matplotlib, scikit-learn) come with ``pip install "densenet-efficient[tools]"``.
"""
