namespace MiniLlm.Loader;

/// <summary>A model file or directory that cannot be used as it is. The message names the file and, where there is one, the tensor.</summary>
public class ModelFormatException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>A model name or path that resolves to nothing; the message says where we looked.</summary>
public sealed class ModelNotFoundException(string message) : Exception(message);
