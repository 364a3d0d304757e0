// Classify a photo on Android with the files `evit-deploy export m2 --target litert` (.tflite) and
// `--target executorch` (.pte) make, or `evit-deploy build examples/evit-deploy.toml`. Each file
// carries its evit-deploy description (JSON): the input's shape and type, the crop, mean/std and
// the labels; the app reads the preprocessing from it instead of repeating it.
//
// build.gradle.kts, for the runtime the app links:
//   LiteRT:     the LiteRT (TensorFlow Lite) interpreter, and org.tensorflow:tensorflow-lite-metadata
//               for the flatbuffer schema classes (org.tensorflow.lite.schema) that read the description
//   ExecuTorch: org.pytorch:executorch-android 1.1 or newer (float16 tensors, for fp16 programs)
package com.example.evitdeploy

import android.graphics.Bitmap
import android.util.Half
import java.io.File
import java.io.FileInputStream
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.channels.FileChannel
import org.json.JSONObject
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.tensorflow.lite.DataType
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.schema.Model

/** What the app needs from an artifact's evit-deploy description. */
class Description(json: String) {
    private val root = JSONObject(json)
    private val preprocessing = root.getJSONObject("preprocessing")
    private val input = root.getJSONArray("inputs").getJSONObject(0)
    val height = preprocessing.getInt("height")
    val width = preprocessing.getInt("width")
    val resize = preprocessing.getInt("resize")        // the short side before the centre crop
    val mean = FloatArray(3) { preprocessing.getJSONArray("mean").getDouble(it).toFloat() }
    val std = FloatArray(3) { preprocessing.getJSONArray("std").getDouble(it).toFloat() }
    val shape = input.getJSONArray("shape").let { s -> LongArray(s.length()) { s.getLong(it) } }
    val dtype: String = input.optString("dtype", "float32")   // "float16" for ExecuTorch fp16 programs
    val labels = root.optJSONArray("labels")?.let { l -> List(l.length()) { l.getString(it) } } ?: emptyList()
}

/** Short side to `resize`, centre crop, RGB scaled to 0..1 and normalised: one NCHW image.
 *  (evit-deploy resizes bicubic; Android's filtered scaling is bilinear, close enough to keep
 *  the top-1 of the photos evit-deploy verifies with, but check with your own.) */
fun preprocess(photo: Bitmap, d: Description): FloatArray {
    val scale = d.resize.toFloat() / minOf(photo.width, photo.height)
    val resized = Bitmap.createScaledBitmap(
        photo, Math.round(photo.width * scale), Math.round(photo.height * scale), true)
    val pixels = IntArray(d.width * d.height)
    resized.getPixels(pixels, 0, d.width, (resized.width - d.width) / 2, (resized.height - d.height) / 2,
                      d.width, d.height)
    val plane = d.width * d.height
    val x = FloatArray(3 * plane)
    for (i in 0 until plane) {
        val rgb = intArrayOf((pixels[i] shr 16) and 0xFF, (pixels[i] shr 8) and 0xFF, pixels[i] and 0xFF)
        for (c in 0 until 3) x[c * plane + i] = (rgb[c] / 255f - d.mean[c]) / d.std[c]
    }
    return x
}

fun top5(logits: FloatArray, labels: List<String>): List<Pair<String, Float>> =
    logits.indices.sortedByDescending { logits[it] }.take(5).map { (labels.getOrNull(it) ?: "$it") to logits[it] }

// -- LiteRT (.tflite) ---------------------------------------------------------------------------

/** The description evit-deploy stores as the model's metadata entry "evit_deploy.description". */
fun liteRtDescription(model: ByteBuffer): Description {
    val flatbuffer = Model.getRootAsModel(model.duplicate())
    for (i in 0 until flatbuffer.metadataLength()) {
        val entry = flatbuffer.metadata(i)
        if (entry.name() == "evit_deploy.description") {
            val bytes = flatbuffer.buffers(entry.buffer().toInt()).dataAsByteBuffer()
            return Description(Charsets.UTF_8.decode(bytes).toString())
        }
    }
    error("not an evit-deploy model: no evit_deploy.description metadata")
}

fun classifyWithLiteRt(file: File, photo: Bitmap): List<Pair<String, Float>> {
    val model = FileInputStream(file).channel.use { it.map(FileChannel.MapMode.READ_ONLY, 0, it.size()) }
    val d = liteRtDescription(model)
    // The default Interpreter applies XNNPACK, which runs every operator of these models.
    Interpreter(model).use { interpreter ->
        val input = interpreter.getInputTensor(0)
        val x = preprocess(photo, d)
        val feed = ByteBuffer.allocateDirect(input.numBytes()).order(ByteOrder.nativeOrder())
        if (input.dataType() == DataType.INT8) {
            // int8 models take int8 images: quantize with the input tensor's scale and zero point.
            val q = input.quantizationParams()
            for (v in x) feed.put(Math.round(v / q.scale + q.zeroPoint).coerceIn(-128, 127).toByte())
        } else {
            feed.asFloatBuffer().put(x)
        }
        feed.rewind()
        val output = interpreter.getOutputTensor(0)
        val result = ByteBuffer.allocateDirect(output.numBytes()).order(ByteOrder.nativeOrder())
        interpreter.run(feed, result)
        result.rewind()
        val q = output.quantizationParams()
        val logits = FloatArray(output.shape()[1]) {
            if (output.dataType() == DataType.INT8) (result.get() - q.zeroPoint) * q.scale else result.getFloat()
        }
        return top5(logits, d.labels)
    }
}

// -- ExecuTorch (.pte) --------------------------------------------------------------------------

fun classifyWithExecuTorch(file: File, photo: Bitmap): List<Pair<String, Float>> {
    val module = Module.load(file.absolutePath)
    try {
        // evit-deploy stores the description as the program's constant method of that name.
        val d = Description(module.execute("evit_deploy_description")[0].toStr())
        val x = preprocess(photo, d)
        val image = if (d.dtype == "float16") {
            Tensor.fromBlob(ShortArray(x.size) { Half.toHalf(x[it]) }, d.shape)   // fp16 programs
        } else {
            Tensor.fromBlob(x, d.shape)                                          // fp32 and int8
        }
        val logits = module.forward(EValue.from(image))[0].toTensor().dataAsFloatArray  // widens float16
        return top5(logits, d.labels)
    } finally {
        module.destroy()
    }
}
