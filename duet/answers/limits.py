"""Size limits that keep every answer comparison bounded in time."""

MAX_CLEAN_LEN = 5000  # longer answers are compared as raw text
MAX_PARSE_LEN = 400  # longest answer handed to the number/expression parsers
MAX_TOKENS = 200
MAX_DIGITS = 1000  # digits in one numeric literal
MAX_EXP10 = 1000  # |e| in scientific notation 1e...
MAX_BITS = 4096  # bit length of any exact rational built while parsing
MAX_POW_EXP = 10**6  # largest numeric exponent accepted
MAX_POW_NEST = 3  # a^b^c^d is the deepest power tower accepted
MAX_NEST = 40  # bracket nesting in the expression parser
MAX_FACTORIAL = 1000
MAX_ELEMENTS = 64  # elements in a tuple/set/list
MAX_DEPTH = 3  # nesting of tuples/sets/lists
