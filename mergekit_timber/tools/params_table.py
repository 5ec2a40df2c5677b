"""`python -m mergekit_timber.tools.params_table`: print the README's parameter table.

Rendered from mergekit_timber.method.parameters, the one definition of the parameters
(the CLI help and mergekit's ParameterSpecs come from it too).
"""

from mergekit_timber.method.parameters import markdown_table

if __name__ == "__main__":
    print(markdown_table(), end="")
