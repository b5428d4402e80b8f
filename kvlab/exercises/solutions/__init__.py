"""Solutions to the exercises, one module per chapter (ch01 ... ch08).

Kept apart from the checks (kvlab.exercises.chNN) so that a learner sees a solution only when they
ask for it: `kvlab.exercises.show_solution("attention_head")` prints one, or open this folder.
The tests hold every solution to its check (tests/test_exercises.py), and run each exercise
notebook top to bottom with these substituted for the stubs.
"""
