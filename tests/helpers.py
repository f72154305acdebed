"""Small helpers shared by the tests."""


def forward_derivative(model, param, var=None, direction=1.0):
    """Seed ``direction`` on ``param`` alone, differentiate forward, return ``d var`` (or
    None; the objective and duals are then read from the model)."""
    model.empty_input_sensitivities()
    model.set_forward_parameter(param, direction)
    model.forward_differentiate()
    return None if var is None else model.get_forward_variable(var)
