"""Taylor structured pruning of EfficientViT (supplementary Sec. B of the paper).

:mod:`.groups` says what can be removed together, :mod:`.importance` scores it,
:mod:`.prune` removes the least important channels to a MAC or parameter budget and
recovers by distillation, :mod:`.run` is what ``api.importance``/``api.prune`` do.

torch-pruning is not used, for these reasons. Its dependency graph follows the add of
cascaded group attention (a head's V plus the next head's input split) into the slice of
the residual stream, so it couples a V channel with an embedding channel of the whole
stage and would prune the stage width or nothing; it does not know that a head's Q and K
must keep equal widths, nor that the query's depthwise conv follows Q; and its
TaylorImportance scores weights (|w·∂L/∂w|) group by group as its graph forms them. Here
the groups are written out per module (:mod:`.groups`), the Taylor score is taken on
activations (:mod:`.importance`), and a pruned model is a family member built with
narrower widths whose weights are slices of the original's, which is also what lets a
checkpoint record its architecture as widths. Only torch-pruning's ``mean`` group
normalisation is reproduced (:mod:`.prune`).
"""
