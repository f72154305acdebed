"""Small helpers shared by the tests."""


def forward_derivative(model, param, var=None, direction=1.0):
    """Seed ``direction`` on ``param`` alone, differentiate forward, return ``d var`` (or
    None; the objective and duals are then read from the model)."""
    model.empty_input_sensitivities()
    model.set_forward_parameter(param, direction)
    model.forward_differentiate()
    return None if var is None else model.get_forward_variable(var)


def central_difference(model, direction: dict, outputs, h: float = 1e-6):
    """``(outputs(θ + h v) - outputs(θ - h v)) / 2h`` for the parameter direction
    ``direction`` (Parameter → array); ``outputs()`` re-solves ``model`` and returns an array.
    The parameter values are restored afterwards (the model is not re-solved)."""
    values = {p: p.value.copy() for p in direction}
    shifted = []
    for sign in (1, -1):
        for p, v in direction.items():
            model.set_parameter_value(p, values[p] + sign * h * v)
        shifted.append(outputs())
    for p in direction:
        model.set_parameter_value(p, values[p])
    return (shifted[0] - shifted[1]) / (2 * h)
