"""Solvable models behind the experiments (docs/theory.md §8): the linear STE teacher-student model
with its mean-field limit and plateau predictions (:mod:`.teacher_student`), the fixed quantization
grid they use (:mod:`.grid`), the 1-bit perceptron (:mod:`.binary_perceptron`), and intervals over
their independent replicas (:mod:`.uncertainty`: per-replica t intervals, bootstrap intervals of
fitted exponents).

Nothing here is imported by ``import riverscape``; the experiment scripts import these modules.
"""
