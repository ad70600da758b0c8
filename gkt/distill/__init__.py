"""``gkt distill``: the cloud's teacher writes transfer sets, the edge's student learns them as a LoRA adapter.

collect (priming.py, collect.py) runs in the main environment against a live cloud; train and export
(train.py, loss.py, checkpoint.py, student.py, export.py) run in ``.venv-distill``, which has torch. The two
meet in the transfer set (transfer.py, standard library only so both environments read it the same way).
"""
